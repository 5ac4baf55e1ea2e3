"""`--format bnb`: the Hugging Face bitsandbytes 4-bit layout, written without importing bitsandbytes (read back by
formats/bnb_reader.py).

For a 4-bit linear layer P (bitsandbytes 0.4x-0.50, transformers' `Params4bit` serialization):
    P.weight                              u8  (ceil(n/2), 1)  two 4-bit codes per byte, first in the high nibble
    P.weight.absmax                       f32 [blocks]        (u8 [blocks] with double quant)
    P.weight.quant_map                    f32 [16]            the code table, in CODE order
    P.weight.nested_absmax                f32 [ceil(blocks/256)]   (double quant only)
    P.weight.nested_quant_map             f32 [256]                 (double quant only: signed 8-bit dynamic map)
    P.weight.quant_state.bitsandbytes__nf4  u8 JSON {"quant_type", "blocksize", "dtype", "shape"
                                              [, "nested_blocksize", "nested_dtype", "nested_offset"]}
and config.json's `quantization_config` (quant_method "bitsandbytes", load_in_4bit, ...). Blocks run over the
flattened row-major weight exactly as kbit's do, so kbit's k = 4 `nf` codes (same table, same nibble order)
are bnb NF4 codes byte for byte. kbit's `fp` at k = 4 is the paper's float (smallest magnitude 1/12); bnb's
FP4 table differs (smallest magnitude 0.0625/12) and is not sorted, so `--data-type fp` is quantized against
bnb's own FP4 table and written in its code order; the plan says so. With --calib (--method gptq, or rtn with
importance-weighted scales) the codes and absmax come from GPTQ / weighted RTN on that same grid, run block by
block during calibration (calibrated_4bit).
"""

from __future__ import annotations

import json
import math

import torch

from kbitcli.core import codebooks
from kbitcli.core.blockwise import (DQ_BLOCK, QuantizedTensor, Spec, block_absmax, dequantize, dequantize_scales,
                                    nearest, quantize, quantize_scales)
from kbitcli.core.pack import pack
from kbitcli.core.scale_search import refit_scales, search_scales
from kbitcli.formats.export_common import (Item, calibrate, fix, manifest, module_glob, refuse, require_folder,
                                           result_dict, source_dtype_name, who, write_hf_folder)
from kbitcli.hf import linear_modules, module_of
from kbitcli.io.spill import spill_for

# scale_search unset: plain absmax data-free (plan.auto_search), so the default export is bitsandbytes' own
# quantize_4bit byte for byte; with --calib, importance-weighted candidates as the native format has them
DEFAULTS = {"bits": 4, "block_size": 64, "dtype": "nf", "scale_dtype": "fp32"}
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
QUANT_TYPES = {"nf": "nf4", "fp": "fp4"}
# bitsandbytes' FP4 (E2M1, bias 2) in code order: bit 3 is the sign; magnitudes are not monotone in the code
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
CHUNK = 1 << 21


def quant_map(quant_type: str) -> torch.Tensor:
    return codebooks.nf_codebook(4) if quant_type == "nf4" else FP4_CODE.clone()


def nearest_block(values: int) -> int:
    return min(BLOCKS, key=lambda b: abs(math.log2(b) - math.log2(max(values, 1))))


# ---- what bnb can hold ---------------------------------------------------------------------------------

def check(plan, recipe, linears: set[str]) -> None:
    problems, kinds = [], {}
    for t in plan.quantized:
        s, n = t.spec, t.name
        if module_of(n, linears) is None:
            problems.append((f"bitsandbytes stores nn.Linear weights only and {module_glob(n)!r} is not one",
                             f"--override '{module_glob(n)}=skip'"))
            continue
        if s.bits != 4:
            problems.append((f"bnb holds only 4-bit nf4/fp4 and {who(t, recipe, 'bits')} for {s.bits} bits",
                             fix(t, recipe, "bits", 4, "--bits 4")))
        if s.dtype not in QUANT_TYPES:
            problems.append((f"bnb holds only nf4/fp4 and {who(t, recipe, 'dtype')} for dtype {s.dtype}",
                             fix(t, recipe, "dtype", "nf", "--data-type nf")))
        if s.block_size not in BLOCKS or t.block_label in ("row", "tensor"):
            nb = 64 if t.block_label in ("row", "tensor") else nearest_block(s.block_size)
            problems.append((f"bnb blocks are powers of two from 32 to 4096 values and {who(t, recipe, 'block_size')} "
                             f"for block {t.block_label}",
                             fix(t, recipe, "block_size", nb, f"--block-size {nb}")))
        if not s.double_quant and s.scale_dtype != "fp32":
            problems.append((f"bnb stores fp32 absmax and {who(t, recipe, 'scale_dtype')} for {s.scale_dtype} "
                             "scales", fix(t, recipe, "scale_dtype", "fp32", "--scale-dtype fp32")))
        kinds.setdefault((QUANT_TYPES.get(s.dtype, s.dtype), s.double_quant), n)
    if len(kinds) > 1:
        (a, na), (b, nb) = list(kinds.items())[:2]
        problems.append((f"bnb's quantization_config holds one quant type and one double-quant setting per model, "
                         f"but {na!r} is {a[0]}{'+dq' if a[1] else ''} and {nb!r} is {b[0]}{'+dq' if b[1] else ''}",
                         "(the same --data-type and --double-quant for every quantized tensor)"))
    if not plan.quantized:
        problems.append(("no tensor is quantized, so there is nothing for bitsandbytes to load", "--targets ..."))
    refuse("bnb", problems)


def state_json(quant_type: str, block: int, dtype: str, shape, dq: bool, offset: float | None = None) -> bytes:
    """The quant_state JSON. The double-quant offset is written with 9 significant digits in fixed width (float32
    round-trips exactly), so the entry's length is known before the weights are read and the file streams."""
    d = {"quant_type": quant_type, "blocksize": block, "dtype": dtype, "shape": list(shape)}
    if not dq:
        return json.dumps(d).encode()
    d.update(nested_blocksize=DQ_BLOCK, nested_dtype="float32")
    return (json.dumps(d)[:-1] + f', "nested_offset": {float(offset or 0.0):.8e}}}').encode()


def entries(t, dtype_name: str) -> list:
    s, n = t.spec, math.prod(t.shape)
    nb = math.ceil(n / s.block_size)
    w = t.name
    qtype = QUANT_TYPES[s.dtype]
    out = [(w, torch.uint8, ((n + 1) // 2, 1)),
           (f"{w}.absmax", torch.uint8 if s.double_quant else torch.float32, (nb,)),
           (f"{w}.quant_map", torch.float32, (16,))]
    if s.double_quant:
        out += [(f"{w}.nested_absmax", torch.float32, (math.ceil(nb / DQ_BLOCK),)),
                (f"{w}.nested_quant_map", torch.float32, (256,))]
    js = state_json(qtype, s.block_size, dtype_name, t.shape, s.double_quant, 0.0)
    out.append((f"{w}.quant_state.bitsandbytes__{qtype}", torch.uint8, (len(js),)))
    return out


# ---- quantization ----------------------------------------------------------------------------------------

def quantize_4bit(w: torch.Tensor, spec: Spec, name: str) -> dict:
    """{codes u8 packed, absmax, [nested_absmax, offset]} for one weight. nf4 goes through kbit's own quantizer
    (so the codes are exactly kbit's nf k=4 codes; with scale_search 1 they are bitsandbytes' own codes); fp4
    searches bnb's FP4 table and stores its code order."""
    if spec.dtype == "nf":
        qt = quantize(w, spec, name)
        return {"codes": qt.codes, "absmax": qt.scales, "nested_absmax": qt.scales_absmax, "offset": qt.scales_offset}
    block = spec.block_size
    flat = w.reshape(-1)
    table, codes_of = fp4_sorted()  # -0 duplicates 0: search 15
    codes_of = codes_of.to(torch.uint8)
    step = max(1, CHUNK // block) * block  # whole blocks, an even count: every chunk packs to whole bytes
    absmax = block_absmax(flat, block, name)
    if spec.scale_search > 1:
        absmax = search_scales(flat, absmax, table, block, spec.scale_search, step)
    if spec.scale_refit:
        absmax = refit_scales(flat, absmax, table, block, step)
    amax2 = offset = None
    if spec.double_quant:
        absmax, amax2, offset = quantize_scales(absmax)
        eff = dequantize_scales(absmax, amax2, offset)
    else:
        eff = absmax
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    packed = []
    for start in range(0, flat.numel(), step):
        x = flat[start: start + step].float()
        s = safe[torch.arange(start, start + x.numel()) // block]
        packed.append(pack(codes_of[nearest(x / s, table)], 4))
    return {"codes": torch.cat(packed), "absmax": absmax, "nested_absmax": amax2, "offset": offset}


def fp4_sorted() -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's FP4 table sorted ascending (-0 dropped: it duplicates 0), and each sorted entry's bnb code."""
    order = [int(i) for i in torch.argsort(FP4_CODE, stable=True) if int(i) != 8]
    return FP4_CODE[order], torch.tensor(order, dtype=torch.long)


def calibrated_4bit(w: torch.Tensor, t, H: torch.Tensor, n: int, calib) -> tuple[dict, torch.Tensor]:
    """The quantizer of a calibrated bnb export (calibration/sequential.run's hook): GPTQ (H = sum x x^T over n
    tokens; Hessian 2 H / n) or importance-weighted RTN (H = sum x^2) on bnb's grid. nf4 is kbit's nf k=4 grid
    with fp32 absmax (or kbit's double quant, which is bnb's), so kbit's own calibrated QuantizedTensor is the bnb
    layout; fp4 rounds onto bnb's FP4 table sorted, and the sorted index is written as bnb's code.
    Returns ({codes, absmax[, nested_absmax, offset]}, the dequantized fp32 weight bnb will compute with)."""
    from kbitcli.core.gptq import gptq, rtn
    from kbitcli.core.grid import Grid
    from kbitcli.core.kbit_grid import KbitGrid, quantize_gptq, quantize_weighted

    s = t.spec
    gptq_method = s.method == "gptq"
    if s.dtype == "nf":
        if gptq_method:
            qt = quantize_gptq(w, s, t.name, H / n * 2, damp=calib.damp, act_order=calib.act_order,
                               candidates=s.scale_search, refine=calib.refine)
        else:
            qt = quantize_weighted(w, s, t.name, H / n, s.scale_search)
    else:
        table, code_of = fp4_sorted()
        g = KbitGrid(w, s, t.name, s.scale_search)
        g.table, g.grid = table, Grid(table, g.rounding, candidates=s.scale_search)
        W = w.reshape(w.shape[0], -1).float()
        if gptq_method:
            idx, scale, _ = gptq(W, H / n * 2, s.block_size, g.grid, damp=calib.damp, act_order=calib.act_order,
                                 refine=calib.refine)
        else:
            idx, scale, _ = rtn(W, s.block_size, g.grid, H / n)
        qt = g.to_quantized(w, code_of[idx], scale)
        qt = QuantizedTensor(qt.spec, qt.shape, qt.orig_dtype, qt.codes, qt.scales, FP4_CODE.clone(),
                             qt.scales_absmax, qt.scales_offset)
    parts = {"codes": qt.codes, "absmax": qt.scales, "nested_absmax": qt.scales_absmax, "offset": qt.scales_offset}
    return parts, dequantize(qt, torch.float32)


def produce(item: Item, src, spill=None) -> dict:
    t = item.plan
    if not t.quantized:
        return {t.name: src.get(t.name)}
    s = t.spec
    qtype = QUANT_TYPES[s.dtype]
    q = spill.get(t.name) if spill is not None and t.name in spill else quantize_4bit(src.get(t.name), s, t.name)
    n = t.name
    out = {n: q["codes"].view(-1, 1), f"{n}.absmax": q["absmax"], f"{n}.quant_map": quant_map(qtype)}
    if s.double_quant:
        out[f"{n}.nested_absmax"] = q["nested_absmax"]
        out[f"{n}.nested_quant_map"] = codebooks.dynamic_codebook(8)
    js = state_json(qtype, s.block_size, item.extra["dtype_name"], t.shape, s.double_quant,
                    float(q["offset"]) if s.double_quant else None)
    out[f"{n}.quant_state.bitsandbytes__{qtype}"] = torch.frombuffer(bytearray(js), dtype=torch.uint8)
    return out


def quantization_config(plan, linears: set[str], compute_dtype: str) -> dict:
    q = plan.quantized
    quantized_modules = {module_of(t.name, linears) for t in q}
    dense = sorted(m for m in linears if m not in quantized_modules)
    # transformers replaces its default skip list (lm_head) with this one when it is set, so every linear layer
    # left dense must be named, lm_head included, or loading "works" and the first forward fails
    skip = dense if any(m.split(".")[-1] == "lm_head" for m in quantized_modules) else sorted(set(dense) | {"lm_head"})
    return {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True,
            "load_in_8bit": False, "bnb_4bit_quant_type": QUANT_TYPES[q[0].spec.dtype],
            "bnb_4bit_use_double_quant": q[0].spec.double_quant, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def export(src, src_path: str, dst: str, plan, recipe, recipe_info: dict, *, force: bool, dry_run: bool, progress,
           max_shard_bytes, calib=None) -> dict:
    """calib (a calibration.data.Calibration): the model runs block by block first and every quantized tensor
    inside a block gets GPTQ / importance-weighted RTN codes on bnb's grid (calibrated_4bit)."""
    require_folder(src, "bnb")
    linears = linear_modules(src.config)
    check(plan, recipe, linears)
    compute = source_dtype_name(src)
    items = []
    for t in plan.tensors:
        if t.quantized:
            dn = str(t.dtype).removeprefix("torch.")
            kind = QUANT_TYPES[t.spec.dtype] + ("+dq" if t.spec.double_quant else "")
            items.append(Item(t, entries(t, dn), kind, {"dtype_name": dn}))
        else:
            items.append(Item(t, [(t.name, t.dtype, t.shape)], str(t.dtype).removeprefix("torch.")))
    notes = []
    if any(t.spec.dtype == "fp" for t in plan.quantized):
        notes.append("dtype fp is written as bitsandbytes FP4 (its table, smallest magnitude 0.0052 where kbit's "
                     "fp4 has 0.083); values are quantized against bnb's table")
    odd = [t.name for t in plan.quantized if t.shape[0] % 32]
    if odd:
        notes.append(f"{len(odd)} quantized weights (e.g. {module_glob(odd[0])}) have out_features not divisible by 32, "
                     "which bitsandbytes' CPU AVX512-BF16 kernel asserts on (GPUs are fine); on such a CPU set "
                     "support_avx512bf16_for_cpu = False on each Linear4bit to use its generic path")
    qc = quantization_config(plan, linears, compute)
    result = result_dict("bnb", src_path, dst, dry_run, plan, items, recipe_info, notes=notes)
    result["quantization_config"] = qc
    if dry_run:
        return result
    config = {**src.config, "quantization_config": qc}
    with spill_for(calib, dst) as spill:
        result["calibration"] = calibrate(src, src_path, plan, calib, spill, progress, calibrated_4bit, "bnb")
        files = write_hf_folder(src, dst, items, lambda i: produce(i, src, spill), config, force=force,
                                max_shard_bytes=max_shard_bytes, progress=progress,
                                meta=manifest("bnb", src, recipe_info, result))
    result["files"] = files
    return result
