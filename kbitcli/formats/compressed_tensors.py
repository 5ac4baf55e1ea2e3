"""`--format compressed-tensors`: the `pack-quantized` integer layout vLLM and transformers load.

For a quantized linear layer P (compressed-tensors 0.20, `PackedQuantizationCompressor`):
    P.weight_packed      i32 [rows, ceil(cols * k / 32)]  unsigned codes q + 2^(k-1), densely packed per row:
                         element i of a row occupies bits [i*k, i*k + k) of the row's little-endian int32 words
    P.weight_scale       [rows, cols / G] (group), [rows, 1] (channel), [1] (tensor)
    P.weight_zero_point  packed like the codes along dim 0 (asymmetric schemes only; kbit writes none)
    P.weight_shape       i64 [2]
with config.json `quantization_config` {quant_method: compressed-tensors, format: pack-quantized,
config_groups: {name: {targets, weights: {num_bits, type: int, symmetric, strategy, group_size}}}, ignore}.
The weight is `(q - zero_point) * scale`, groups running along each row (the input dimension).

kbit's `int` type is the symmetric grid q/m, m = 2^(k-1) - 1, times absmax; so its codes are exactly a
symmetric compressed-tensors scheme with scale = absmax / m (kept in fp32 so nothing is rounded twice).
Groups must divide the row (compressed-tensors refuses anything else), so kbit's block B maps to strategy
`group` when B divides every row, `row` to `channel` and `tensor` to `tensor`. compressed-tensors 0.20 packs
1..8 bits; vLLM's kernels run 4 and 8 (docs/INTEROP.md).
"""

from __future__ import annotations

import math
import sys

import torch

from kbitcli.core.blockwise import quantize
from kbitcli.core.pack import unpack
from kbitcli.formats.export_common import (Item, calibrate, fix, manifest, module_glob, refit_problem, refuse, require_folder,
                                           result_dict, who, write_hf_folder)
from kbitcli.hf import linear_modules, module_of
from kbitcli.io.spill import Spill, spill_for

DEFAULTS = {"bits": 4, "block_size": 64, "dtype": "int"}


def divisors_near(cols: int, block: int) -> list[int]:
    """Powers of two 16..4096 that divide cols, nearest to block first."""
    ok = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if cols % b == 0]
    return sorted(ok, key=lambda b: abs(math.log2(b) - math.log2(block)))


def check(plan, recipe, linears: set[str]) -> None:
    problems = []
    for t in plan.quantized:
        s, n = t.spec, t.name
        if module_of(n, linears) is None or len(t.shape) != 2:
            problems.append((f"compressed-tensors packs nn.Linear weights only and {module_glob(n)!r} is not one",
                             f"--override '{module_glob(n)}=skip'"))
            continue
        if s.dtype != "int":
            problems.append((f"pack-quantized stores integer codes and {who(t, recipe, 'dtype')} for dtype "
                             f"{s.dtype}", fix(t, recipe, "dtype", "int", "--data-type int")))
        if s.double_quant:
            problems.append((f"compressed-tensors stores one float scale per group and "
                             f"{who(t, recipe, 'double_quant')} for double-quantized (8-bit) scales",
                             fix(t, recipe, "double_quant", "false", "--no-double-quant")))
        if problem := refit_problem(t, recipe, "compressed-tensors"):
            problems.append(problem)
        cols = t.shape[1]
        if t.block_label not in ("row", "tensor") and cols % s.block_size:
            near = divisors_near(cols, s.block_size)
            to = near[0] if near else "row"
            problems.append((f"compressed-tensors groups must divide the row and {module_glob(n)!r} has rows of "
                             f"{cols} values, which block {s.block_size} does not divide",
                             f"--override '{module_glob(n)}=block_size:{to}'"))
    if not plan.quantized:
        problems.append(("no tensor is quantized", "--targets ..."))
    refuse("compressed-tensors", problems)


def scheme_key(t) -> tuple:
    strat, g = ("channel", None) if t.block_label == "row" else ("tensor", None) if t.block_label == "tensor" \
        else ("group", t.spec.block_size)
    return t.spec.bits, strat, g


def entries(t) -> list:
    k, (rows, cols) = t.spec.bits, t.shape
    _, strat, g = scheme_key(t)
    scale_shape = {"group": (rows, cols // (g or 1)), "channel": (rows, 1), "tensor": (1,)}[strat]
    m = t.name[: -len(".weight")]
    return [(f"{m}.weight_packed", torch.int32, (rows, math.ceil(cols * k / 32))),
            (f"{m}.weight_scale", torch.float32, scale_shape),
            (f"{m}.weight_shape", torch.int64, (2,))]


# ---- packing (LSB-first within little-endian int32 words) ---------------------------------------------------

def pack_rows(q: torch.Tensor, k: int) -> torch.Tensor:
    """Unsigned k-bit values [rows, cols] -> int32 [rows, ceil(cols*k/32)], compressed-tensors' dense packing."""
    rows, cols = q.shape
    groups = math.ceil(cols / 8)  # 8 values fill exactly k bytes
    padded = torch.zeros(rows, groups * 8, dtype=torch.int64)
    padded[:, :cols] = q.to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64) * k  # first value in the least significant bits
    word = (padded.view(rows, groups, 8) << shifts).sum(dim=-1)
    nbytes = (word.unsqueeze(-1) >> (torch.arange(k, dtype=torch.int64) * 8)) & 0xFF  # little-endian bytes
    stream = nbytes.to(torch.uint8).reshape(rows, groups * k)
    words = math.ceil(cols * k / 32)
    out = torch.zeros(rows, words * 4, dtype=torch.uint8)
    n = min(words * 4, groups * k)
    out[:, :n] = stream[:, :n]
    return _le_int32(out)


def unpack_rows(packed: torch.Tensor, k: int, cols: int) -> torch.Tensor:
    """int32 [rows, words] -> unsigned values int64 [rows, cols] (inverse of pack_rows)."""
    rows = packed.shape[0]
    stream = _le_bytes(packed.contiguous())
    groups = math.ceil(cols / 8)
    need = groups * k
    if stream.shape[1] < need:
        stream = torch.cat([stream, torch.zeros(rows, need - stream.shape[1], dtype=torch.uint8)], dim=1)
    b = stream[:, :need].to(torch.int64).view(rows, groups, k)
    word = (b << (torch.arange(k, dtype=torch.int64) * 8)).sum(dim=-1)
    values = (word.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * k)) & ((1 << k) - 1)
    return values.reshape(rows, groups * 8)[:, :cols]


def _le_int32(b: torch.Tensor) -> torch.Tensor:
    if sys.byteorder != "little":
        b = b.view(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    return b.contiguous().view(torch.int32)


def _le_bytes(w: torch.Tensor) -> torch.Tensor:
    b = w.view(torch.uint8)
    if sys.byteorder != "little":
        b = b.view(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    return b


# ---- export -------------------------------------------------------------------------------------------

def calibrated_int(w: torch.Tensor, t, H: torch.Tensor, n: int, calib) -> tuple:
    """The quantizer of a calibrated export (calibration/sequential.run's hook): GPTQ (Hessian 2 H / n) or
    importance-weighted RTN (H = sum x^2) on kbit's int grid, which is this format's symmetric integer grid.
    Returns (the QuantizedTensor for the spill, the dequantized fp32 weight the next layers run on)."""
    from kbitcli.core.blockwise import dequantize
    from kbitcli.core.kbit_grid import quantize_gptq, quantize_weighted

    s = t.spec
    if s.method == "gptq":
        qt = quantize_gptq(w, s, t.name, H / n * 2, damp=calib.damp, act_order=calib.act_order,
                           candidates=s.scale_search, refine=calib.refine)
    else:
        qt = quantize_weighted(w, s, t.name, H / n, s.scale_search)
    return qt, dequantize(qt, torch.float32)


def produce(item: Item, src, spill=None) -> dict:
    t = item.plan
    if not t.quantized:
        return {t.name: src.get(t.name)}
    k = t.spec.bits
    if spill is not None and t.name in spill:  # calibrated: GPTQ / weighted-RTN codes on the same grid
        qt = spill.get(t.name)
    else:
        qt = quantize(src.get(t.name), t.spec, t.name)  # kbit's own int codes: index c into [-m..m]/m
    mx = 2 ** (k - 1) - 1
    rows, cols = t.shape
    codes = unpack(qt.codes, k, rows * cols).view(rows, cols)
    stored = codes + 1  # q = c - m; stored unsigned q + 2^(k-1) = c + 1
    scale = qt.effective_scales() / mx
    scale = scale.reshape(entries(t)[1][2])
    m = t.name[: -len(".weight")]
    return {f"{m}.weight_packed": pack_rows(stored, k), f"{m}.weight_scale": scale.float().contiguous(),
            f"{m}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}


def quantization_config(plan, linears: set[str]) -> dict:
    groups: dict[tuple, list[str]] = {}
    for t in plan.quantized:
        groups.setdefault(scheme_key(t), []).append(module_of(t.name, linears))
    quantized = {m for ms in groups.values() for m in ms}
    ignore = sorted(m for m in linears if m not in quantized)
    config_groups = {}
    for i, ((bits, strat, g), modules) in enumerate(groups.items()):
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strat, "group_size": g,
                   "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax"}
        # one scheme: target the Linear class (what llm-compressor writes); several: name the modules
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if len(groups) == 1 else sorted(modules),
                                       "weights": weights, "input_activations": None, "output_activations": None,
                                       "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def export(src, src_path: str, dst: str, plan, recipe, recipe_info: dict, *, force: bool, dry_run: bool, progress,
           max_shard_bytes, calib=None) -> dict:
    """calib (a calibration.data.Calibration): the model runs block by block first and every quantized tensor
    inside a block gets GPTQ / importance-weighted RTN codes on the int grid (calibrated_int)."""
    require_folder(src, "compressed-tensors")
    linears = linear_modules(src.config)
    check(plan, recipe, linears)
    items = []
    for t in plan.tensors:
        if t.quantized:
            bits, strat, g = scheme_key(t)
            items.append(Item(t, entries(t), f"int{bits} " + (f"g{g}" if g else strat)))
        else:
            items.append(Item(t, [(t.name, t.dtype, t.shape)], str(t.dtype).removeprefix("torch.")))
    qc = quantization_config(plan, linears)
    notes = []
    if any(t.spec.bits not in (4, 8) for t in plan.quantized):
        notes.append("vLLM's compressed-tensors kernels run 4- and 8-bit pack-quantized weights; other widths load "
                     "in transformers / compressed-tensors (which decompress them) but not in vLLM")
    result = result_dict("compressed-tensors", src_path, dst, dry_run, plan, items, recipe_info, notes=notes)
    result["quantization_config"] = qc
    if dry_run:
        return result
    config = {**src.config, "quantization_config": qc}
    with spill_for(calib, dst, Spill) as spill:
        result["calibration"] = calibrate(src, src_path, plan, calib, spill, progress, calibrated_int,
                                          "compressed-tensors")
        result["files"] = write_hf_folder(src, dst, items, lambda i: produce(i, src, spill), config, force=force,
                                          max_shard_bytes=max_shard_bytes, progress=progress,
                                          meta=manifest("compressed-tensors", src, recipe_info, result))
    return result
