"""Sequential calibration: the model's blocks run one at a time, each on the outputs of the blocks already
quantized (as GPTQModel and llm-compressor do), so a block's quantization sees the error the earlier ones made.

Memory stays bounded whatever the depth: the model is built with every parameter on the `meta` device; only
the tensors outside the blocks (embeddings, norms) and one block at a time are read from the checkpoint. What
lives at once: one dense block, its calibration activations (tokens x hidden, twice), and per linear layer a
Hessian (in x in). Each finished tensor goes to a spill file on disk (io/spill.py), not to memory.

Per block: (1) run it on the calibration inputs with hooks on its target linear layers, accumulating
H = 2 X^T X / n (GPTQ) or diag(H) / 2 = E[x^2] (importance-weighted RTN); (2) quantize every target of the
block; (3) put the dequantized weights in place and run the block again: its outputs feed the next block.
"""

from __future__ import annotations

import contextlib
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

    from kbitcli.hf import load_tokenizer, model_class, params_on_meta, read_config

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


def run(src, src_path: str, plan, calib: Calibration, spill, progress=None, quantizer=None) -> dict:
    """Every quantized tensor of `plan` (method rtn or gptq) that lies inside a block is calibrated (GPTQ, or
    importance-weighted RTN) and written to `spill`; the rest are left to the plain encoder. Returns the
    calibration record for the manifest.

    quantizer(w, t, H, n, calib) -> (result for spill.put, dequantized fp32 weight) quantizes on another
    format's grid (e.g. GGUF's); H is sum x x^T over the n calibration tokens ([in, in]) for gptq tensors, and
    sum x^2 ([in]) for rtn ones. Default: kbit's own grid (a QuantizedTensor)."""
    from kbitcli.hf import name_mapper

    t0 = time.time()
    jobs = {t.name: t for t in plan.quantized}  # checkpoint tensor name -> its TensorPlan
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
    # asymmetric calibration keeps a second stream: the dense model's own activations, block after block
    inputs_fp = list(inputs) if calib.asymmetric else None
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
                if not isinstance(mod, nn.Linear):  # GPT-2 Conv1D stores [in, out]: blocks run across outputs
                    raise bad_input(f"{ck}: calibrated quantization of GPT-2 Conv1D weights is not supported yet; "
                                    "use --method rtn without --calib")
                targets[ck] = mod
        # true sequential (as GPTQModel): layers that read the same input (q, k, v) form a stage, and each
        # stage is calibrated on the outputs of the stages before it, already quantized
        stages = _stages(block, targets, inputs[0], kwargs[0]) if calib.true_sequential else [list(targets)]
        dense_w = {ck: m.weight.data for ck, m in targets.items()} if inputs_fp is not None else None
        for stage in stages:
            mods = {ck: targets[ck] for ck in stage}
            if inputs_fp is not None:
                stats = _collect_asymmetric(block, mods, inputs, inputs_fp, kwargs, targets, dense_w)
            else:
                stats = _collect(block, mods, inputs, kwargs, jobs)
            for ck in stage:
                mod = targets[ck]
                t = jobs[ck]
                w = mod.weight.data
                if quantizer is not None:
                    H, n = stats[ck]
                    result, wq = quantizer(w, t, H, n, calib)
                else:
                    result = _quantize(w, t, stats.get(ck), calib)
                    wq = dequantize(result, torch.float32)
                spill.put(ck, result)
                calibrated.append(ck)
                mod.weight.data = wq.view_as(w)
        if inputs_fp is not None:
            with _weights(targets, dense_w):
                inputs_fp = _forward(block, inputs_fp, kwargs)
        inputs = _forward(block, inputs, kwargs)
        block.to("meta")  # frees the dense block
        if progress is not None:
            progress.advance(f"block {bi + 1}/{len(blocks)}, {windows.numel():,} tokens, {time.time() - t0:.0f} s", 0)
    if progress is not None:
        progress.stop()
    done = set(calibrated)
    skipped = [n for n in jobs if n not in done]
    rec = calib.record(windows.numel(), len(windows), seq)
    rec.update(seconds=round(time.time() - t0, 2), calibrated_tensors=len(calibrated), uncalibrated=skipped)
    return rec


def _quantize(w: torch.Tensor, t, stats, calib: Calibration):
    spec = t.spec
    if stats is None:  # a data-free tensor inside a block: quantized as the plain encoder will, for the forward
        return quantize(w, spec, t.name)
    if spec.method == "gptq":
        if len(stats) == 3:  # asymmetric: the target is the dense output W X_fp, reached from X_q
            H, C, n = stats
            w = least_squares_target(w, H, C, calib.damp)
        else:
            H, n = stats
        return quantize_gptq(w, spec, t.name, H / n * 2, damp=calib.damp, act_order=calib.act_order,
                             candidates=spec.scale_search, refine=calib.refine)
    H, n = stats[0], stats[-1]  # importance-weighted RTN: imatrix = E[x_j^2] (the diagonal of a full X^T X)
    importance = torch.diagonal(H) if H.dim() == 2 else H
    return quantize_weighted(w, spec, t.name, importance / n, spec.scale_search)


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


def least_squares_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """argmin_q ||X_fp w - X_q q||^2 for every row: q* = (H + damp)^-1 C w with H = X_q^T X_q, C = X_q^T X_fp.
    GPTQ on q* with the same H then minimises the error against the *dense* layer output (GPTAQ's
    asymmetric calibration), so each layer also corrects what earlier quantized layers changed in its input."""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean().clamp(min=1e-12))
    # written as w + correction, so the dampening shrinks the correction towards 0, not the weights
    wt = w.double().t()
    return (wt + torch.linalg.solve(Hd, (C.double() - H.double()) @ wt)).t().float()


@contextlib.contextmanager
def _weights(mods: dict, weights: dict):
    """Inside: the modules hold the given weights (e.g. the dense ones); restored on the way out."""
    saved = {ck: m.weight.data for ck, m in mods.items()}
    try:
        for ck, m in mods.items():
            m.weight.data = weights[ck]
        yield
    finally:
        for ck, m in mods.items():
            m.weight.data = saved[ck]


def _collect_asymmetric(block, stage: dict, inputs, inputs_fp, kwargs, all_targets: dict, dense_w: dict) -> dict:
    """Per stage layer: (H = sum x_q x_q^T, C = sum x_q x_fp^T, n), pairing each batch's quantized-stream
    input x_q with the dense model's input x_fp at the same tokens."""
    out: dict[str, list] = {}
    seen: dict = {}

    def capture(store, ck):
        def hook(_mod, args):
            store[ck] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    for xq_in, xf_in, (args, kw) in zip(inputs, inputs_fp, kwargs):
        xf, xq = {}, {}
        for store, x, weights in ((xf, xf_in, dense_w), (xq, xq_in, None)):
            handles = [m.register_forward_pre_hook(capture(store, ck)) for ck, m in stage.items()]
            try:
                ctx = _weights(all_targets, weights) if weights is not None else contextlib.nullcontext()
                with torch.no_grad(), ctx:
                    block(x, *args, **kw)
            finally:
                for h in handles:
                    h.remove()
        seen.clear()
        for ck in stage:
            key = xq[ck].data_ptr()
            if key not in seen:
                seen[key] = ((xq[ck].t() @ xq[ck]).double(), (xq[ck].t() @ xf[ck]).double())
            acc = out.setdefault(ck, [0, 0, 0])
            acc[0] = acc[0] + seen[key][0]
            acc[1] = acc[1] + seen[key][1]
            acc[2] += xq[ck].shape[0]
    return {ck: tuple(v) for ck, v in out.items()}


def _stages(block, targets: dict, x, args_kw) -> list[list[str]]:
    """Target layers grouped by the input they read, in the order the block calls them."""
    calls = []
    keep = []

    def make_hook(ck):
        def hook(_mod, args):
            keep.append(args[0])  # held, so no two inputs share an address during this forward
            calls.append((ck, args[0].data_ptr(), tuple(args[0].shape)))
        return hook

    handles = [m.register_forward_pre_hook(make_hook(ck)) for ck, m in targets.items()]
    try:
        with torch.no_grad():
            block(x, *args_kw[0], **args_kw[1])
    finally:
        for h in handles:
            h.remove()
    stages, last = [], None
    for ck, ptr, shape in calls:
        if ck in {c for st in stages for c in st}:
            continue
        if (ptr, shape) != last:
            stages.append([])
            last = (ptr, shape)
        stages[-1].append(ck)
    missed = [ck for ck in targets if all(ck not in st for st in stages)]
    return stages + ([missed] if missed else [])


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
                # the cache holds x itself, so its memory cannot be freed and reused by another input of the
                # same shape (which would then hit this entry) while the batch runs
                cache[key] = (x, (x.t() @ x).double() if need_full else x.pow(2).sum(0).double())
            acc = sums.setdefault(ck, [0, 0])
            acc[0] = acc[0] + cache[key][1]
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
