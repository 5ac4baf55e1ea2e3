"""Predicted loss of quantizing one tensor with one choice: sum over its weights of importance * error^2.

The error is delta = W - dequantize(quantize(W)), exactly what encode's round-to-nearest produces. The
importance of weight w_ij is one of (docs/PLAN.md has the correlations with the measured ΔNLL):
- "weight" (data-free): 1 for every weight, i.e. ||W - Q(W)||^2.
- "activation" (--calib): E[x_j^2], the input's energy on column j, so the sum is the expected squared error
  of the layer's output (the diagonal of GPTQ's Hessian).
- "fisher" (--calib, the default with it): E[g_ij^2], the squared gradient of the loss on the calibration
  text, so 1/2 * sum F_ij delta_ij^2 is the second-order estimate of the change in loss (nats per token, up
  to the empirical-Fisher approximation). Unlike the other two it knows how much the model's output depends
  on each layer, which is what differs most between tensors (a v_proj or the last layers matter more).
"""

from __future__ import annotations

import os

import torch

from kbitcli.core.blockwise import dequantize, quantize

KINDS = ("weight", "activation", "fisher")
SELF = "self"  # --calib self: the model writes its own calibration text
SELF_SAMPLE_TOKENS = 256


def tensor_losses(w: torch.Tensor, specs: list, importance: torch.Tensor | None = None, scale: float = 1.0) -> list:
    """Predicted loss for each Spec in `specs` (None entries give None). importance: None, [in] (per input
    column) or the full [out, in] map."""
    w = w.float()
    out = []
    for spec in specs:
        if spec is None:
            out.append(None)
            continue
        err = dequantize(quantize(w, spec), torch.float32).view_as(w).sub_(w).pow_(2)
        if importance is not None:
            err.mul_(importance)
        out.append(float(err.sum(dtype=torch.float64)) * scale)
    return out


def self_calibration(model, tok, calib, progress=None):
    """A Calibration on text the model samples itself (prompt '', temperature 1, the calibration seed): in the
    model's own domain without any data, and never the text a benchmark scores. Measured on stories260K, whose
    domain Wikipedia is far from, it made the plans markedly better than Fisher on Wikipedia (docs/PLAN.md)."""
    import dataclasses
    import tempfile

    from kbitcli.models.generate import generate_text

    if progress is not None:
        progress.start("sensitivity: sample text", 0, 1)
    n = -(-int(calib.tokens * 1.25) // SELF_SAMPLE_TOKENS)  # 25% spare: samples that stop at end-of-text are shorter
    out = generate_text(model, tok, "", max_new_tokens=SELF_SAMPLE_TOKENS, temperature=1.0, seed=calib.seed, samples=n)
    fd, path = tempfile.mkstemp(prefix="kbit-plan-self-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n\n".join(" ".join(t.split("\n")) for t in out["samples"]) + "\n")
    if progress is not None:
        progress.stop()
    return dataclasses.replace(calib, path=path), out["new_tokens"]


def collect_importance(src_path: str, names: list[str], calib, kind: str, progress=None) -> tuple[dict, dict]:
    """checkpoint name -> importance map for each of `names` (kind 'activation': [in]; 'fisher': [out, in]),
    from the dense model run on the calibration text; and a record of what was used."""
    import time

    from kbitcli.calibration.data import calibration_windows
    from kbitcli.calibration.sequential import _seq_len
    from kbitcli.hf import name_mapper
    from kbitcli.models.load import load_model

    t0 = time.time()
    model, tok = load_model(src_path, dtype="fp32")
    seq = _seq_len(model.config, calib)
    generated = None
    if calib.path == SELF:
        calib, generated = self_calibration(model, tok, calib, progress)
    try:
        windows = calibration_windows(tok, calib, seq)
    finally:
        if generated is not None:
            os.unlink(calib.path)
    params = dict(model.named_parameters())
    to_model = name_mapper(set(params), getattr(model, "base_model_prefix", ""))
    targets = {n: to_model(n) for n in names}
    missing = [n for n, m in targets.items() if m is None]
    if missing:
        from kbitcli.errors import bad_input

        raise bad_input(f"{src_path}: tensor {missing[0]!r} is no parameter of {type(model).__name__}; "
                        "plan it data-free (without --calib)")
    sums: dict[str, torch.Tensor] = {}
    handles = []
    if kind == "activation":
        modules = dict(model.named_modules())
        for n, m in targets.items():
            mod = modules[m.removesuffix(".weight")]

            def hook(_mod, args, n=n):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[n] = sums.get(n, 0) + x.pow(2).sum(0).double()
            handles.append(mod.register_forward_pre_hook(hook))
    for p in model.parameters():
        p.requires_grad_(False)  # only the targets need gradients
    if kind == "fisher":
        for m in targets.values():
            params[m].requires_grad_(True)
    if progress is not None:
        progress.start("sensitivity: run", 0, len(windows))
    tokens = 0
    try:
        for i in range(len(windows)):
            ids = windows[i : i + 1]
            tokens += ids.numel()
            if kind == "fisher":
                # one window's mean NLL per backward: the empirical Fisher of per-window gradients
                loss = model(input_ids=ids, labels=ids).loss
                model.zero_grad(set_to_none=True)
                loss.backward()
                for n, m in targets.items():
                    g = params[m].grad
                    sums[n] = sums[n].add_(g.pow(2)) if n in sums else g.pow(2)
            else:
                with torch.no_grad():
                    model(input_ids=ids)
            if progress is not None:
                progress.advance(f"window {i + 1}/{len(windows)}", 0)
    finally:
        for h in handles:
            h.remove()
        if progress is not None:
            progress.stop()
    n_windows = len(windows)
    if kind == "activation":
        imp = {n: (s / tokens).float() for n, s in sums.items()}
    else:
        # E_w[g_w^2] of per-window mean-NLL gradients is about F_token / T for T tokens a window, and the loss
        # change is 1/2 delta^T F_token delta: so 1/2 * T * E_w[g_w^2] weights delta^2 in nats per token
        imp = {n: s.div_(n_windows).mul_(0.5 * seq) for n, s in sums.items()}
    rec = {"file": calib.path if generated is None else f"self ({generated} tokens sampled from the model)", "tokens": tokens, "windows": n_windows, "seq_len": seq, "seed": calib.seed,
           "seconds": round(time.time() - t0, 2)}
    del model
    return imp, rec

