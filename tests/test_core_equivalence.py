"""The fast quantization core must give exactly what the plain definition gives.

`kbitcli.core.blockwise` / `pack` are tuned for speed (chunking, in-place ops, byte-wise packing...). This file
spells out the definition the on-disk format rests on (docs/FORMAT.md) as a slow, readable reference written
from scratch here, and checks the fast path against it bit for bit — codes, scales, double-quant constants,
codebooks and decoded values — on real weights of stories260K and MiniLM, every data type, k in {2,3,4,5,8},
double quant on and off, ragged tensors and odd block sizes. Any speed-up that changes a single bit fails here.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kbitcli.core import blockwise, codebooks
from kbitcli.core.blockwise import Spec, dequantize, dequantize_range, quantize
from kbitcli.core.pack import pack, packed_nbytes, unpack
from kbitcli.errors import KbitError
from kbitcli.paths import STORIES260K

DTYPES = ("int", "fp", "nf", "quantile", "dynamic")
BITS = (2, 3, 4, 5, 8)


# ----------------------------------------------------------------------------------------------------------
# The reference: the format's definition, one step at a time, in plain torch
# ----------------------------------------------------------------------------------------------------------

def ref_block_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """absmax of each block of `block` consecutive values; the last block may be shorter (zero-filling it
    changes no absmax)."""
    padded = torch.cat([flat.float(), torch.zeros(-flat.numel() % block)])
    return padded.view(-1, block).abs().amax(dim=1)


def ref_nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Code = number of midpoints between neighbouring table entries that lie strictly below the value
    (a value exactly on a midpoint takes the lower entry). Counted by numpy, independently of torch."""
    mids = ((table[1:] + table[:-1]) / 2).numpy()
    return torch.from_numpy(np.searchsorted(mids, values.reshape(-1).numpy(), side="left").astype(np.int64))


def ref_pack(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Write every code's k bits, most significant first, into one bit stream; cut it into bytes (first bit
    = most significant bit of the byte); zero-fill the last byte."""
    codes = codes.reshape(-1).long()
    bits = (codes[:, None] >> torch.arange(k - 1, -1, -1)) & 1
    stream = bits.reshape(-1)
    stream = torch.cat([stream, torch.zeros(-stream.numel() % 8, dtype=torch.int64)])
    return (stream.view(-1, 8) * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])).sum(dim=1).to(torch.uint8)


def ref_unpack(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    bits = (packed.long()[:, None] >> torch.arange(7, -1, -1)) & 1
    stream = bits.reshape(-1)[: n * k].view(n, k)
    return (stream * (1 << torch.arange(k - 1, -1, -1))).sum(dim=1)


def ref_double_quant(absmax: torch.Tensor):
    """bitsandbytes-style: subtract the mean, then 8-bit dynamic codes in blocks of 256 scales."""
    offset = absmax.mean().reshape(1)
    centered = absmax - offset
    table = codebooks.dynamic_codebook(8)
    codes, amax2 = [], []
    for i in range(0, centered.numel(), 256):
        part = centered[i : i + 256]
        m = part.abs().max()
        amax2.append(m)
        codes.append(ref_nearest(part / (m if m > 0 else torch.tensor(1.0)), table))
    codes, amax2 = torch.cat(codes).to(torch.uint8), torch.stack(amax2)
    effective = table[codes.long()] * amax2.repeat_interleave(256)[: codes.numel()] + offset
    return codes, amax2, offset, effective


def ref_quantile_table(flat: torch.Tensor, scales: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """The tensor's own table, from a strided sample of at most 2^20 block-normalized values."""
    divisor = torch.where(scales > 0, scales, torch.ones(())).repeat_interleave(block)[: flat.numel()]
    stride = max(1, math.ceil(flat.numel() / (1 << 20)))
    return codebooks.quantile_codebook(flat[::stride].float() / divisor[::stride], k)


def ref_search_scales(flat: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int, n: int):
    """Per block, of the scales absmax * (1 - 0.05 i), i < n, the first with the least sum of squared errors
    sum((table[code(x / s)] * s - x)^2) over the block (fp32; whole blocks summed as rows, the short last
    block on its own)."""
    x = flat.float()
    full = x.numel() // block * block
    rows = [(x[:full].view(-1, block), slice(0, full // block))] if full else []
    if full < x.numel():
        rows.append((x[full:].view(1, -1), slice(full // block, full // block + 1)))
    best = absmax.clone()
    for xb, sl in rows:
        candidates = [absmax[sl] * (1 - 0.05 * i) for i in range(n)]
        errors = []
        for s in candidates:
            s = torch.where(s > 0, s, torch.ones(()))[:, None]
            codes = ref_nearest(xb / s, table).view(xb.shape)
            errors.append((table[codes] * s - xb).pow(2).sum(dim=1))
        errors = torch.stack(errors)  # [n, blocks]
        first_best = errors.argmin(dim=0)  # argmin returns the first of equal minima
        best[sl] = torch.stack(candidates).gather(0, first_best[None]).squeeze(0)
    return best


def ref_quantize(w: torch.Tensor, spec: Spec) -> dict:
    flat, B, k = w.reshape(-1), spec.block_size, spec.bits
    absmax = ref_block_absmax(flat, B)
    table = None
    if spec.scale_search > 1:
        # the table the search measures errors with is the final one (a quantile table: from plain absmax)
        table = ref_quantile_table(flat, absmax, B, k) if spec.dtype == "quantile" else codebooks.fixed_codebook(spec.dtype, k)
        absmax = ref_search_scales(flat, absmax, table, B, spec.scale_search)
    if spec.scale_refit:
        # one Lloyd step: codes against the fp32 scale, then each block's least-squares scale for those codes
        if table is None:
            table = ref_quantile_table(flat, absmax, B, k) if spec.dtype == "quantile" else codebooks.fixed_codebook(spec.dtype, k)
        safe = torch.where(absmax > 0, absmax, torch.ones(()))
        v = table[ref_nearest(flat.float() / safe.repeat_interleave(B)[: flat.numel()], table)]
        pad = (-flat.numel()) % B
        xb = torch.cat([flat.float(), flat.new_zeros(pad, dtype=torch.float32)]).view(-1, B)
        vb = torch.cat([v, v.new_zeros(pad)]).view(-1, B)
        xv, vv = (xb * vb).sum(dim=1), (vb * vb).sum(dim=1)
        fit = xv / torch.where(vv > 0, vv, torch.ones(()))
        absmax = torch.where(fit > 0, fit, absmax)
    out = {}
    if spec.double_quant:
        out["scales"], out["scales_absmax"], out["scales_offset"], effective = ref_double_quant(absmax)
        coded = effective  # codes against the scales as the decoder will read them
    else:
        # stored scales are the fp32 ones rounded to nearest in the scale dtype; the codes are those of the fp32
        # scale (for absmax: bitsandbytes' codes), except a refit scale, which is coded again against its stored value
        out["scales"] = absmax.to(blockwise.SCALE_DTYPES[spec.scale_dtype])
        effective = out["scales"].float()
        coded = effective if spec.scale_refit else absmax
    divisor = torch.where(coded > 0, coded, torch.ones(()))  # an all-zero block divides by 1
    per_value = divisor.repeat_interleave(B)[: flat.numel()]
    if table is None:
        table = ref_quantile_table(flat, coded, B, k) if spec.dtype == "quantile" else codebooks.fixed_codebook(spec.dtype, k)
    codes = ref_nearest(flat.float() / per_value, table)
    out.update(codes=ref_pack(codes, k), codebook=table)
    out["decoded"] = table[codes] * effective.repeat_interleave(B)[: flat.numel()]
    return out


# ----------------------------------------------------------------------------------------------------------
# Real tensors
# ----------------------------------------------------------------------------------------------------------

def _load(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def weights(minilm_dir) -> dict[str, torch.Tensor]:
    s = _load(os.path.join(STORIES260K, "model.safetensors"),
              ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"])
    m = _load(os.path.join(minilm_dir, "model.safetensors"),
              ["encoder.layer.0.intermediate.dense.weight", "encoder.layer.3.output.dense.weight",
               "embeddings.word_embeddings.weight"])
    return {
        "stories.down_proj[64x172]": s["model.layers.0.mlp.down_proj.weight"],
        "stories.k_proj[32x64]": s["model.layers.1.self_attn.k_proj.weight"],
        # 147,456 values: big enough for the fast path to build its code lookup for a quantile table too
        "minilm.intermediate[384x384]": m["encoder.layer.0.intermediate.dense.weight"][:384].clone(),
        # ragged: 37 * 101 = 3737 values is no multiple of 8 nor of any block size; the last block is short
        "minilm.output[37x101]": m["encoder.layer.3.output.dense.weight"][:37, :101].clone(),
        "minilm.embeddings[3000x384]": m["embeddings.word_embeddings.weight"][:3000].clone(),
    }


def spec_id(spec: Spec) -> str:
    return f"{spec.dtype}{spec.bits}-b{spec.block_size}" + ("-dq" if spec.double_quant else "")


def assert_same(qt, ref: dict, name: str) -> None:
    assert torch.equal(qt.codes, ref["codes"]), f"{name}: codes differ"
    assert qt.scales.dtype == ref["scales"].dtype and torch.equal(qt.scales, ref["scales"]), f"{name}: scales differ"
    assert torch.equal(qt.codebook, ref["codebook"]), f"{name}: codebook differs"
    if qt.spec.double_quant:
        assert torch.equal(qt.scales_absmax, ref["scales_absmax"]), f"{name}: scales_absmax differ"
        assert torch.equal(qt.scales_offset, ref["scales_offset"]), f"{name}: scales_offset differs"
    else:
        assert qt.scales_absmax is None and qt.scales_offset is None
    decoded = dequantize(qt, torch.float32)
    assert decoded.shape == qt.shape
    assert torch.equal(decoded.reshape(-1), ref["decoded"]), f"{name}: decoded values differ"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(weights, dtype, bits, double_quant):
    spec = Spec(bits, 64, dtype, double_quant)
    for name in ("stories.down_proj[64x172]", "minilm.intermediate[384x384]", "minilm.output[37x101]"):
        w = weights[name]
        assert_same(quantize(w, spec, name), ref_quantize(w, spec), f"{name} {spec}")


@pytest.mark.parametrize("block", [16, 172, 256, 4096, "row", "tensor"])
@pytest.mark.parametrize("dtype", ["nf", "quantile"])
def test_block_sizes_match_reference(weights, dtype, block):
    # 172 is stories260K's row length (what `row` resolves to for down_proj): blocks that are not a multiple of 8
    for name in ("stories.down_proj[64x172]", "stories.k_proj[32x64]", "minilm.output[37x101]"):
        w = weights[name]
        spec = Spec(4, blockwise.resolve_block(block, tuple(w.shape)), dtype, block == 256)
        assert_same(quantize(w, spec, name), ref_quantize(w, spec), f"{name} {spec}")


@pytest.mark.parametrize("spec", [Spec(4, 64, "nf"), Spec(3, 64, "quantile", True), Spec(2, 172, "int"),
                                  Spec(8, 64, "fp", True), Spec(5, 16, "dynamic")], ids=spec_id)
def test_scale_search_matches_reference(weights, spec):
    spec = dataclasses.replace(spec, scale_search=4)  # the recipes' default
    for name in ("stories.down_proj[64x172]", "minilm.output[37x101]", "minilm.intermediate[384x384]"):
        w = weights[name]
        assert_same(quantize(w, spec, name), ref_quantize(w, spec), f"{name} {spec}")


@pytest.mark.parametrize("spec", [Spec(4, 64, "nf"), Spec(3, 64, "quantile", True), Spec(2, 172, "int"),
                                  Spec(8, 64, "fp", True), Spec(5, 16, "dynamic", scale_dtype="bf16"),
                                  Spec(4, 64, "nf", scale_search=4)], ids=spec_id)
def test_scale_refit_matches_reference(weights, spec):
    spec = dataclasses.replace(spec, scale_refit=True)  # opt-in: recipe scale_refit: true
    for name in ("stories.down_proj[64x172]", "minilm.output[37x101]", "minilm.intermediate[384x384]"):
        w = weights[name]
        assert_same(quantize(w, spec, name), ref_quantize(w, spec), f"{name} {spec}")
    w = weights["stories.down_proj[64x172]"]
    for block in ("row", "tensor"):
        s = dataclasses.replace(spec, block_size=blockwise.resolve_block(block, tuple(w.shape)))
        assert_same(quantize(w, s), ref_quantize(w, s), f"{block} {s}")


@pytest.mark.parametrize("scale_dtype", ["bf16", "fp32"])
def test_scale_dtypes_match_reference(weights, scale_dtype):
    w = weights["minilm.output[37x101]"]
    spec = Spec(4, 64, "nf", False, scale_dtype)
    assert_same(quantize(w, spec), ref_quantize(w, spec), scale_dtype)


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_match_reference(weights, src_dtype):
    w = weights["minilm.output[37x101]"].to(src_dtype)
    if src_dtype == torch.float64:  # values with more bits than fp32 holds (the reference rounds them first)
        w = w * (1 + 2**-40)
    for spec in (Spec(4, 64, "nf", True), Spec(3, 64, "fp"), Spec(8, 64, "int")):
        assert_same(quantize(w, spec), ref_quantize(w, spec), f"{src_dtype} {spec}")
    qt = quantize(w, Spec(4, 64, "nf"))
    ref = ref_quantize(w, Spec(4, 64, "nf"))["decoded"]
    assert torch.equal(dequantize(qt, src_dtype).reshape(-1), ref.to(src_dtype))


@pytest.mark.parametrize("chunk", [64 * 8, 1000, 4096 + 8])  # a whole number of blocks, or not
@pytest.mark.parametrize("spec", [Spec(4, 64, "nf", True), Spec(5, 172, "quantile"), Spec(3, 16, "fp")], ids=spec_id)
def test_chunk_boundaries_do_not_change_results(weights, monkeypatch, chunk, spec):
    """Tensors span many chunks in real models; shrink the chunk so a small real tensor spans dozens."""
    monkeypatch.setattr(blockwise, "CHUNK", chunk)
    for name in ("stories.down_proj[64x172]", "minilm.output[37x101]"):
        w = weights[name]
        assert_same(quantize(w, spec, name), ref_quantize(w, spec), f"{name} {spec} chunk={chunk}")


def test_large_tensor_matches_reference(weights):
    """1.15M values: several default-size chunks, and more than the 2^20 values a quantile table samples."""
    w = weights["minilm.embeddings[3000x384]"]
    for spec in (Spec(4, 64, "nf", True), Spec(8, 64, "int"), Spec(4, 64, "quantile")):
        assert_same(quantize(w, spec), ref_quantize(w, spec), str(spec))


@pytest.mark.parametrize("dtype", codebooks.FIXED_DTYPES)
def test_code_lookup_matches_reference_on_every_kind_of_float(dtype):
    """The fast nearest-code search (a table lookup on the float's top bits) against the plain rule, on floats
    from all over the number line: a stride through every bit pattern, ±0, ±inf, subnormals, the midpoints
    themselves and their neighbours."""
    from kbitcli.core.nearest import CodeLookup, NearestCodes

    patterns = torch.arange(-(2**31), 2**31, 9973, dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 1.0, -1.0, 2.0, -2.0])
    for bits in range(2, 9):
        table = codebooks.fixed_codebook(dtype, bits)
        mids = (table[1:] + table[:-1]) / 2
        up, down = torch.nextafter(mids, torch.tensor(9.0)), torch.nextafter(mids, torch.tensor(-9.0))
        v = torch.cat([patterns[~patterns.isnan()], special, mids, up, down, table]).contiguous()
        assert CodeLookup.build(table) is not None, f"{dtype}{bits}: no lookup"
        codes = NearestCodes(table, v.numel(), v.numel(), reused=True)(v)
        assert torch.equal(codes.long(), ref_nearest(v, table)), f"{dtype}{bits}"


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_reference(weights, bits):
    # real codes: the nf codes of a real weight, cut to lengths that end mid-byte
    w = weights["minilm.output[37x101]"].reshape(-1)
    table = codebooks.nf_codebook(bits) if bits >= 2 else torch.tensor([-1.0, 1.0])
    codes = ref_nearest(w / w.abs().max(), table)
    for n in (codes.numel(), codes.numel() - 3, 8, 7, 1):
        c = codes[:n]
        packed = pack(c, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
        assert torch.equal(packed, ref_pack(c, bits)), f"k={bits} n={n}"
        assert torch.equal(unpack(packed, bits, n), ref_unpack(packed, bits, n)), f"k={bits} n={n}"
        assert torch.equal(unpack(packed, bits, n), c)


@pytest.mark.parametrize("spec", [Spec(4, 64, "nf", True), Spec(3, 172, "quantile"), Spec(5, 16, "dynamic")], ids=spec_id)
def test_dequantize_range_matches_reference(weights, spec):
    w = weights["minilm.output[37x101]"]
    qt, ref = quantize(w, spec), ref_quantize(w, spec)["decoded"]
    n = w.numel()
    for start, stop in ((0, n), (0, 1), (5, 77), (64, 3000), (171, 173), (n - 9, n), (1003, 1004)):
        got = dequantize_range(qt, start, stop)
        assert torch.equal(got, ref[start:stop]), f"[{start}:{stop})"


def test_all_zero_blocks_decode_to_zero(weights):
    w = weights["minilm.output[37x101]"].clone()
    w.view(-1)[64:192] = 0  # two whole blocks of zeros
    for spec in (Spec(4, 64, "nf"), Spec(4, 64, "nf", True), Spec(3, 64, "quantile")):
        qt, ref = quantize(w, spec), ref_quantize(w, spec)
        assert_same(qt, ref, str(spec))
        if not spec.double_quant:  # (with double quant the scale is offset + code * absmax: near, not at, 0)
            assert torch.count_nonzero(dequantize(qt).reshape(-1)[64:192]) == 0


def test_nan_is_reported_at_its_index_in_any_chunk(weights, monkeypatch):
    monkeypatch.setattr(blockwise, "CHUNK", 512)
    w = weights["minilm.output[37x101]"].clone()
    w.view(-1)[2345] = float("nan")
    with pytest.raises(KbitError, match="flat index 2345"):
        quantize(w, Spec(4, 64, "nf"), "layer.weight")


def test_encode_writes_the_reference_codes_with_any_number_of_workers(tmp_path, monkeypatch, stories_dir):
    """The whole `kbit encode` path (tensors quantized on worker threads, written at planned offsets): the same
    bytes with 1 or 3 workers, and every quantized tensor in the file is the reference's."""
    import kbitcli.encode as encode_module
    from kbitcli.formats.kbit_format import KbitCheckpoint
    from kbitcli.recipes import Recipe

    outputs = []
    for workers in (1, 3):
        monkeypatch.setattr("kbitcli.formats.kbit_write.default_workers", lambda: workers)
        dst = tmp_path / f"workers{workers}"
        encode_module.encode(stories_dir, str(dst), Recipe(double_quant=True, scale_search=4, scale_refit=True))
        outputs.append((dst / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
    ck = KbitCheckpoint(str(tmp_path / "workers1"))
    source = _load(os.path.join(stories_dir, "model.safetensors"), ck.names)
    quantized = [n for n in ck.names if ck.is_quantized(n)]
    assert len(quantized) >= 7 * 5  # every linear weight of the 5 layers
    for name in quantized:
        qt = ck.quantized(name)  # (the reader's spec leaves out the scale search and refit: decoding needs neither)
        spec = dataclasses.replace(qt.spec, scale_search=4, scale_refit=ck.meta[name]["scale_refit"])
        assert ck.meta[name]["scale_refit"]
        assert_same(qt, ref_quantize(source[name], spec), name)
