"""Sequential calibration: the model's blocks run one at a time, each on the outputs of the blocks already
quantized (as GPTQModel and llm-compressor do), so a block's quantization sees the error the earlier ones made.

Memory stays bounded whatever the depth: the model is built with every parameter on the `meta` device; only
the tensors outside the blocks (embeddings, norms) and one block at a time are read from the checkpoint. What
lives at once: one dense block, its calibration activations (tokens x hidden, twice), and per linear layer a
Hessian (in x in). Each finished tensor goes to a spill file on disk (calibration/spill.py), not to memory.

Per block: (1) run it on the calibration inputs with hooks on its target linear layers, accumulating
H = 2 X^T X / n (GPTQ) or diag(H) / 2 = E[x^2] (importance-weighted RTN); (2) quantize every target of the
block; (3) put the dequantized weights in place and run the block again: its outputs feed the next block.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from kbitcli.calibration.data import DEFAULT_SEQ, Calibration, calibration_windows
from kbitcli.core.blockwise import dequantize, quantize
from kbitcli.core.kbit_grid import quantize_gptq, quantize_weighted
from kbitcli.errors import bad_input

BATCH_TOKENS = 4096  # tokens per forward: bounds attention and activation memory


class _Captured(Exception):
    pass


def _linear_types():
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the longest ModuleList whose every element holds a linear layer (decoder layers
    of a Llama, BERT's encoder layers, GPT-2's h)."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(
                any(isinstance(s, _linear_types()) for s in b.modules()) for b in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise bad_input(f"{type(model).__name__}: no repeated blocks of linear layers found; calibration needs a "
                        "transformer-style model (use --method rtn without --calib for this one)")
    return best


def build_on_meta(src_path: str):
    from transformers import initialization as hf_init

    from kbitcli.models.load import load_tokenizer, model_class, params_on_meta, read_config

    config, _ = read_config(src_path)
    tok = load_tokenizer(src_path)
    if tok is None:
        raise bad_input(f"{src_path}: no tokenizer files (tokenizer.json / tokenizer.model / vocab.txt) to read the "
                        "calibration text with; add them, or use --method rtn without --calib")
    cls = model_class(config)
    with params_on_meta(), hf_init.no_init_weights():
        model = cls._from_config(config, dtype=torch.float32)
    return model.eval(), tok, config


def _seq_len(config, calib: Calibration) -> int:
    cfg = config.to_dict()
    limit = next((cfg[k] for k in ("max_position_embeddings", "n_positions") if isinstance(cfg.get(k), int)), None)
    seq = calib.seq_len or min(DEFAULT_SEQ, limit or DEFAULT_SEQ)
    if limit and seq > limit:
        raise bad_input(f"--calib-seq {seq} is longer than the model's {limit} positions")
    return seq


def run(src, src_path: str, jobs: dict, calib: Calibration, spill, progress=None, log=None) -> dict:
    """jobs: checkpoint tensor name -> TensorPlan of every quantized tensor (method rtn or gptq). The ones
    inside a block are calibrated (GPTQ, or importance-weighted RTN) and written to `spill`; the rest are left
    to the plain encoder. Returns the calibration record for the manifest."""
    from kbitcli.models.load import name_mapper

    t0 = time.time()
    calib.check()
    model, tok, config = build_on_meta(src_path)
    seq = _seq_len(config, calib)
    windows = calibration_windows(tok, calib, seq)
    prefix, blocks = find_blocks(model)
    model_keys = set(model.state_dict())
    to_model = name_mapper(model_keys, getattr(model, "base_model_prefix", ""))
    ck_of = {}  # model name -> checkpoint name
    for name in src.names:
        m = to_model(name)
        if m is not None:
            ck_of.setdefault(m, name)

    # everything outside the blocks (embeddings, norms, rotary tables are buffers) is read once
    outside = {m: src.get(c).float() for m, c in ck_of.items()
               if not m.startswith(prefix + ".") and "lm_head" not in m and src.info(c)[0].is_floating_point}
    model.load_state_dict(outside, strict=False, assign=True)
    del outside

    per = max(1, BATCH_TOKENS // seq)
    batches = [windows[i : i + per] for i in range(0, len(windows), per)]
    inputs, kwargs = _capture(model, blocks[0], batches)
    model_blocks_prefix = prefix + "."
    calibrated = []
    if progress is not None:
        progress.start("calibrate", 0, len(blocks))
    for bi, block in enumerate(blocks):
        bprefix = f"{model_blocks_prefix}{bi}."
        state = {n: src.get(ck_of[bprefix + n]).float() for n, _ in block.named_parameters()
                 if bprefix + n in ck_of}
        missing = [n for n, _ in block.named_parameters() if n not in state]
        if missing:
            raise bad_input(f"{src_path}: no tensor for {bprefix + missing[0]}; the checkpoint does not fit its config.json")
        block.load_state_dict(state, strict=False, assign=True)
        del state
        targets = {}
        for mname, mod in block.named_modules():
            ck = ck_of.get(f"{bprefix}{mname}.weight")
            if ck in jobs and isinstance(mod, _linear_types()):
                targets[ck] = mod
        stats = _collect(block, targets, inputs, kwargs, jobs)
        for ck, mod in targets.items():
            t = jobs[ck]
            w = mod.weight.data
            if not isinstance(mod, nn.Linear):  # GPT-2 Conv1D stores [in, out]: blocks run across outputs
                raise bad_input(f"{ck}: calibrated quantization of GPT-2 Conv1D weights is not supported yet; "
                                "use --method rtn without --calib")
            qt = _quantize(w, t, stats.get(ck), calib)
            spill.put(ck, qt)
            calibrated.append(ck)
            mod.weight.data = dequantize(qt, torch.float32).view_as(w)
            if log is not None:
                log(ck)
        inputs = _forward(block, inputs, kwargs)
        block.to("meta")  # frees the dense block
        if progress is not None:
            progress.advance(f"block {bi + 1}/{len(blocks)}, {windows.numel():,} tokens, {time.time() - t0:.0f} s", 0)
    if progress is not None:
        progress.stop()
    skipped = [n for n in jobs if n not in set(calibrated)]
    rec = calib.record(windows.numel(), len(windows), seq)
    rec.update(seconds=round(time.time() - t0, 2), calibrated_tensors=len(calibrated), uncalibrated=skipped)
    return rec


def _quantize(w: torch.Tensor, t, stats, calib: Calibration):
    spec = t.spec
    if stats is None:  # a data-free tensor inside a block: quantized as the plain encoder will, for the forward
        return quantize(w, spec, t.name)
    if spec.method == "gptq":
        H, n = stats
        return quantize_gptq(w, spec, t.name, H / n * 2, damp=calib.damp, act_order=calib.act_order,
                             candidates=spec.scale_search)
    H, n = stats  # importance-weighted RTN: imatrix = E[x_j^2]
    return quantize_weighted(w, spec, t.name, H / n, spec.scale_search)


def _capture(model, first_block, batches):
    """The inputs (hidden states, and the other arguments the model passes) of the first block, per batch."""
    inputs, kwargs = [], []

    def hook(_mod, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append((tuple(args[1:]), {k: v for k, v in kw.items() if k != "hidden_states"}))
        raise _Captured

    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                except _Captured:
                    pass
    finally:
        h.remove()
    return inputs, kwargs


def _forward(block, inputs, kwargs):
    outs = []
    with torch.no_grad():
        for x, (args, kw) in zip(inputs, kwargs):
            y = block(x, *args, **kw)
            outs.append(y[0] if isinstance(y, (tuple, list)) else y)
    return outs


def _collect(block, targets: dict, inputs, kwargs, jobs) -> dict:
    """checkpoint name -> (sum of x x^T over tokens [in, in] (GPTQ) or sum of x^2 [in] (RTN), token count).
    Linear layers fed the same tensor (q, k, v) share one product."""
    sums: dict[str, list] = {}
    cache: dict = {}

    def make_hook(ck, need_full):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            key = (x.data_ptr(), tuple(x.shape), need_full)
            if key not in cache:
                cache[key] = (x.t() @ x).double() if need_full else x.pow(2).sum(0).double()
            acc = sums.setdefault(ck, [0, 0])
            acc[0] = acc[0] + cache[key]
            acc[1] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(ck, jobs[ck].spec.method == "gptq")) for ck, m in targets.items()]
    try:
        with torch.no_grad():
            for x, (args, kw) in zip(inputs, kwargs):
                cache.clear()
                block(x, *args, **kw)
    finally:
        for h in handles:
            h.remove()
    return {ck: (v[0], v[1]) for ck, v in sums.items()}
