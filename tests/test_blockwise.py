"""Block-wise quantization on real weights: ragged blocks, row/tensor blocks, scales, double quant, bit
accounting, and bit-exact agreement with bitsandbytes where the two define the same thing."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors import safe_open

from kbitcli.core import blockwise as bw
from kbitcli.core.blockwise import Spec, dequantize, dequantize_range, quantize, sqnr_db
from kbitcli.core.codebooks import DTYPES
from kbitcli.errors import KbitError


@pytest.fixture(scope="module")
def weights(stories_dir) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


@pytest.fixture(scope="module")
def down(weights):
    return weights["model.layers.0.mlp.down_proj.weight"]  # 64 x 172: rows are not a multiple of 64


@pytest.fixture(scope="module")
def odd(weights):
    return weights["model.layers.1.self_attn.q_proj.weight"][:7, :13].contiguous()  # 91 values


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_type_and_k_round_trips_ragged(down, dtype, k):
    qt = quantize(down, Spec(k, 64, dtype))
    n = down.numel()
    assert qt.n_blocks == math.ceil(n / 64) == 172 and qt.scales.numel() == 172
    assert qt.codes.numel() == math.ceil(n * k / 8)
    out = dequantize(qt)
    assert out.shape == down.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert sqnr_db(down, out) > {2: 2.0, 3: 10.0}.get(k, 15.0)
    # every decoded value is a table entry times its block's scale: nothing else leaks in
    flat, scales = out.reshape(-1), qt.effective_scales()
    ratio = flat / scales[torch.arange(n) // 64]
    assert torch.isclose(ratio[:, None], qt.codebook[None, :], atol=1e-5).any(dim=1).all()


@pytest.mark.parametrize("block", [16, 32, 64])
def test_blocks_are_independent_and_unpadded(odd, block):
    """Each block (the last one is short: 91 = 5*16 + 11 values) quantizes exactly as if it were alone."""
    spec = Spec(3, block, "nf", scale_search=1)
    qt = quantize(odd, spec)
    flat, out = odd.reshape(-1), dequantize(qt).reshape(-1)
    assert out.numel() == 91
    for j in range(qt.n_blocks):
        piece = flat[j * block : (j + 1) * block]
        alone = quantize(piece, Spec(3, piece.numel(), "nf", scale_search=1))
        amax = piece.abs().max()
        assert alone.scales.item() == qt.scales[j].item()
        # the stored fp16 scale is the block's absmax rounded to nearest
        assert qt.scales[j] == amax.to(torch.float16)
        assert torch.equal(dequantize(alone), out[j * block : (j + 1) * block])


@pytest.mark.parametrize("k,dtype,scale_dtype", [(4, "nf", "fp16"), (3, "int", "fp16"), (4, "fp", "bf16"),
                                                  (2, "quantile", "fp16")])
def test_data_free_codes_are_those_of_the_fp32_scale(down, k, dtype, scale_dtype):
    """Plain absmax with fp16/bf16 scales stores the same codes as with fp32 scales (bitsandbytes' codes for
    NF4), and each scale is its fp32 value rounded to nearest: the narrower scale changes decoded values by one
    rounding of the scale, never which code a weight gets."""
    exact = quantize(down, Spec(k, 64, dtype, scale_dtype="fp32", scale_search=1))
    narrow = quantize(down, Spec(k, 64, dtype, scale_dtype=scale_dtype, scale_search=1))
    assert torch.equal(narrow.codes, exact.codes) and torch.equal(narrow.codebook, exact.codebook)
    assert torch.equal(narrow.scales, exact.scales.to(bw.SCALE_DTYPES[scale_dtype]))
    moved = (narrow.scales.float() - exact.scales).abs()
    assert moved.max() > 0  # the case is not vacuous: some scales did round


def test_row_and_tensor_blocks(down):
    row = quantize(down, Spec(4, bw.resolve_block("row", tuple(down.shape)), "int", scale_search=1))
    assert row.spec.block_size == 172 and row.scales.numel() == 64
    assert torch.equal(row.scales, down.abs().amax(dim=1).to(torch.float16))
    whole = quantize(down, Spec(4, bw.resolve_block("tensor", tuple(down.shape)), "int", scale_search=1))
    assert whole.scales.numel() == 1 and whole.scales.item() == down.abs().max().to(torch.float16).item()
    # finer blocks, smaller error: 64 < row (172) < tensor (11008)
    e64 = sqnr_db(down, dequantize(quantize(down, Spec(4, 64, "int", scale_search=1))))
    assert e64 > sqnr_db(down, dequantize(row)) > sqnr_db(down, dequantize(whole))


def test_row_of_a_convolution_is_one_output_channel():
    """A conv weight [out, in/groups, kh, kw]: 'row' is one scale per output channel (in/groups·kh·kw values),
    not per kernel row (kw values: a 3x3 kernel would get a scale every 3 weights)."""
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-3, 0, 8)[:, None, None, None]  # channels of very different size
    qt = quantize(w, Spec(4, bw.resolve_block("row", tuple(w.shape)), "int", scale_search=1))
    assert qt.spec.block_size == 36 and qt.scales.numel() == 8
    assert torch.equal(qt.scales, w.abs().flatten(1).amax(dim=1).to(torch.float16))
    assert bw.resolve_block("row", (5,)) == 5


def test_int8_error_is_within_half_a_step(down):
    qt = quantize(down, Spec(8, 64, "int", scale_dtype="fp32", scale_search=1))
    err = (dequantize(qt) - down).abs().reshape(-1)
    step = qt.scales[torch.arange(down.numel()) // 64] / 127
    assert torch.all(err <= step / 2 * (1 + 1e-5))


def test_zero_blocks_and_zero_tensor(down):
    w = down.clone().reshape(-1)
    w[128:192] = 0
    out = dequantize(quantize(w, Spec(4, 64, "quantile"))).reshape(-1)
    assert torch.all(out[128:192] == 0)
    assert torch.all(dequantize(quantize(torch.zeros(5, 40), Spec(4, 16, "nf"))) == 0)


def test_nan_and_inf_are_refused_naming_the_tensor(down):
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = down.clone()
        w[3, 100] = bad
        with pytest.raises(KbitError, match=r"'blocks\.3\.w'.*NaN/Inf.*flat index 616") as e:
            quantize(w, Spec(4, 64, "nf"), name="blocks.3.w")
        assert e.value.exit_code == 2


def test_fp16_scale_overflow_is_refused_but_fp32_and_bf16_work(down):
    big = down * 1e6  # |w| up to ~1e5 > fp16 max 65504
    with pytest.raises(KbitError, match="scale_dtype: fp32"):
        quantize(big, Spec(4, 64, "nf", scale_dtype="fp16"), name="big")
    for sd in ("fp32", "bf16"):
        qt = quantize(big, Spec(4, 64, "nf", scale_dtype=sd))
        assert sqnr_db(big, dequantize(qt)) > 18


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_source_dtypes(down, dtype):
    w = down.to(dtype)
    qt = quantize(w, Spec(4, 64, "nf"))
    assert qt.orig_dtype == dtype and dequantize(qt, dtype).dtype == dtype
    assert sqnr_db(w, dequantize(qt, dtype)) > 18


def test_dequantize_range_equals_slices(down):
    qt = quantize(down, Spec(5, 64, "fp", True))
    full = dequantize(qt).reshape(-1)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        a = int(torch.randint(0, full.numel() - 1, (1,), generator=g))
        b = int(torch.randint(a + 1, full.numel() + 1, (1,), generator=g))
        assert torch.equal(dequantize_range(qt, a, b), full[a:b])


def test_chunked_work_equals_block_by_block(weights):
    """A tensor bigger than one chunk (2^21 values) gives the same codes as quantizing its blocks alone."""
    emb = weights["model.embed_tokens.weight"].reshape(-1)
    w = emb.repeat(bw.CHUNK // emb.numel() + 2)[: bw.CHUNK + 172 * 3 + 5]  # crosses the chunk boundary, ragged tail
    qt = quantize(w, Spec(3, 172, "int", scale_search=1))
    out = dequantize(qt)
    for j in (0, bw.CHUNK // 172 - 1, bw.CHUNK // 172, bw.CHUNK // 172 + 1, qt.n_blocks - 1):
        piece = w[j * 172 : (j + 1) * 172]
        alone = quantize(piece, Spec(3, piece.numel(), "int", scale_search=1))
        assert torch.equal(dequantize(alone), out[j * 172 : (j + 1) * 172])


# --- double quantization -----------------------------------------------------------------------------


def test_double_quant_layout_and_formula(down):
    qt = quantize(down, Spec(4, 64, "nf", True))
    assert qt.scales.dtype == torch.uint8 and qt.scales.numel() == 172
    assert qt.scales_absmax.dtype == torch.float32 and qt.scales_absmax.numel() == 1  # ceil(172 / 256)
    assert qt.scales_offset.dtype == torch.float32 and qt.scales_offset.numel() == 1
    table = bw.codebooks.dynamic_codebook(8)
    expect = table[qt.scales.long()] * qt.scales_absmax[torch.arange(172) // 256] + qt.scales_offset
    assert torch.equal(qt.effective_scales(), expect)


def test_double_quant_uses_blocks_of_256_scales(weights):
    w = weights["model.embed_tokens.weight"]  # 32768 values -> 512 blocks of 64 -> 2 groups of 256
    qt = quantize(w, Spec(4, 64, "nf", True, scale_search=1))
    assert qt.scales_absmax.numel() == 2
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    centered = absmax - absmax.mean()
    assert torch.equal(qt.scales_absmax, centered.view(2, 256).abs().amax(dim=1))
    assert (qt.effective_scales() - absmax).abs().max() < 0.01 * absmax.max()


# --- bitsandbytes equivalence (plain absmax: scale_search = 1) ------------------------------------


def test_nf4_codes_and_values_equal_bitsandbytes(down):
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(down, blocksize=64, quant_type="nf4")
    qt = quantize(down, Spec(4, 64, "nf", scale_dtype="fp32", scale_search=1))
    assert torch.equal(q.reshape(-1), qt.codes)  # same table, same nibble order, same ragged blocks
    assert torch.equal(st.absmax, qt.scales)
    assert torch.equal(F.dequantize_4bit(q, st), dequantize(qt))


def test_double_quant_scale_codes_equal_bitsandbytes_and_codes_are_no_worse(down):
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(down, blocksize=64, quant_type="nf4", compress_statistics=True)
    qt = quantize(down, Spec(4, 64, "nf", True, scale_search=1))
    assert torch.equal(st.absmax, qt.scales) and torch.equal(st.state2.absmax, qt.scales_absmax)
    assert torch.allclose(st.offset.reshape(1), qt.scales_offset)
    # bitsandbytes picks the 4-bit codes with the fp32 absmax it then rounds; we pick them with the scales the
    # decoder will really use, so our error is not larger
    assert sqnr_db(down, dequantize(qt)) >= sqnr_db(down, F.dequantize_4bit(q, st))


def test_dynamic8_is_exact_nearest_never_worse_than_bitsandbytes(down):
    import bitsandbytes.functional as F

    q8, st8 = F.quantize_blockwise(down, blocksize=64)
    qt = quantize(down, Spec(8, 64, "dynamic", scale_dtype="fp32", scale_search=1))
    assert torch.equal(st8.absmax, qt.scales)
    ours = (dequantize(qt) - down).abs()
    theirs = (F.dequantize_blockwise(q8, st8) - down).abs()
    assert torch.all(ours <= theirs + 1e-9)


# --- scale search ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int", "nf", "fp"])
def test_scale_search_never_raises_the_error_and_keeps_scales_at_most_absmax(down, dtype):
    plain = quantize(down, Spec(3, 64, dtype, scale_dtype="fp32", scale_search=1))
    searched = quantize(down, Spec(3, 64, dtype, scale_dtype="fp32", scale_search=8))
    assert torch.all(searched.scales <= plain.scales)
    err_plain = (dequantize(plain) - down).reshape(-1, 172).pow(2).sum()
    err_searched = (dequantize(searched) - down).reshape(-1, 172).pow(2).sum()
    assert err_searched <= err_plain


# --- scale refit (opt-in: scale_refit: true; plan.auto_refit) ---------------------------------------


def block_errors(w: torch.Tensor, qt, block: int) -> torch.Tensor:
    """Squared error of every block (the last one may be short: zero padding adds no error)."""
    d = (dequantize(qt).reshape(-1).double() - w.reshape(-1).double())
    return torch.cat([d, d.new_zeros(-d.numel() % block)]).pow(2).view(-1, block).sum(dim=1)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_refit_never_raises_a_blocks_error(down, dtype, k):
    # fp32 scales: absmax codes -> least-squares scale -> codes again can only lower each block's error
    plain = quantize(down, Spec(k, 64, dtype, scale_dtype="fp32"))
    refit = quantize(down, Spec(k, 64, dtype, scale_dtype="fp32", scale_refit=True))
    e_plain, e_refit = block_errors(down, plain, 64), block_errors(down, refit, 64)
    assert torch.all(e_refit <= e_plain * (1 + 1e-5) + 1e-12)
    assert e_refit.sum() < e_plain.sum()  # and it does lower it on real weights
    # with the stored fp16 scales (rounded to nearest, not up) the tensor's error still drops
    half = quantize(down, Spec(k, 64, dtype, scale_refit=True))
    assert half.scales.dtype == torch.float16 and block_errors(down, half, 64).sum() < e_plain.sum()


def test_refit_scales_is_the_least_squares_scale_of_the_absmax_codes(down):
    from kbitcli.core.scale_search import refit_scales

    table = bw._fixed_table("nf", 4)
    flat = down.reshape(-1)  # 64 x 172: blocks run across rows
    flat = torch.cat([flat, flat[:37]])  # a short last block
    absmax = bw.block_absmax(flat, 64, "w")
    got = refit_scales(flat, absmax, table, 64, 64 * 8)  # small chunks: many chunk boundaries
    for b in range(absmax.numel()):
        x = flat[b * 64 : (b + 1) * 64].double()
        v = table.double()[bw.nearest(x.float() / absmax[b], table)]
        assert got[b].item() == pytest.approx(float((x * v).sum() / (v * v).sum()), rel=1e-5)


def test_scale_refit_keeps_zero_blocks_zero(down):
    w = down.clone()
    w.view(-1)[64:192] = 0  # two whole zero blocks
    qt = quantize(w, Spec(4, 64, "nf", scale_refit=True))
    assert torch.all(qt.scales[1:3] == 0) and torch.all(dequantize(qt).view(-1)[64:192] == 0)
    assert torch.all(dequantize(quantize(torch.zeros(8, 64), Spec(4, 64, "nf", scale_refit=True))) == 0)


def test_scale_refit_with_double_quant_codes_against_the_stored_scales(down):
    qt = quantize(down, Spec(4, 64, "nf", True, scale_refit=True))
    again = bw.nearest(bw._per_block(down.reshape(-1).float(), qt.effective_scales(), 64, torch.div,
                                     torch.empty(down.numel())), qt.codebook)
    assert torch.equal(bw.unpack_u8(qt.codes, 4, down.numel()).long(), again)
    plain = quantize(down, Spec(4, 64, "nf", True))
    assert block_errors(down, qt, 64).sum() < block_errors(down, plain, 64).sum()


# --- bit accounting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [Spec(4, 64, "nf"), Spec(3, 16, "int", True), Spec(5, 128, "quantile"),
                                  Spec(7, 172, "fp", scale_dtype="fp32"), Spec(2, 4096, "dynamic", True)])
def test_bits_are_counted_from_what_is_stored(down, spec):
    qt = quantize(down, spec)
    n = down.numel()
    actual = sum(t.numel() * t.element_size() * 8 for t in
                 (qt.codes, qt.scales, qt.scales_absmax, qt.scales_offset) if t is not None)
    if spec.dtype == "quantile":
        actual += qt.codebook.numel() * 32
    assert bw.storage_bits(qt, count_codebook=spec.dtype == "quantile") == actual == bw.layout_bits(spec, n)
    layout = bw.layout(spec, n)
    assert layout["codes"] == (torch.uint8, (qt.codes.numel(),))
    assert layout["scales"] == (qt.scales.dtype, (qt.scales.numel(),))


def test_bits_per_param_formula():
    # the paper's k + 16/B for 16-bit scales; bitsandbytes' 4 + 8/64 + 32/(64*256) (+ one offset) with DQ
    n = 64 * 256 * 4
    assert bw.layout_bits(Spec(4, 64, "nf"), n) / n == 4.25
    assert bw.layout_bits(Spec(3, 128, "int"), n) / n == 3 + 16 / 128
    dq = bw.layout_bits(Spec(4, 64, "nf", True), n) / n
    assert dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert round(dq, 3) == 4.127


def test_sqnr_db():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))


def test_the_papers_ordering_on_real_weights(weights):
    """Quantile >= float > int at 3 and 4 bits (the paper's finding), on all of stories260K's linear weights."""
    ws = [w for n, w in weights.items() if w.ndim == 2 and "proj" in n]
    flat = torch.cat([w.reshape(-1) for w in ws])

    def sqnr(dtype, k):
        out = torch.cat([dequantize(quantize(w, Spec(k, 64, dtype, scale_search=1))).reshape(-1) for w in ws])
        return sqnr_db(flat, out)

    for k in (3, 4):
        assert sqnr("quantile", k) >= sqnr("fp", k) > sqnr("int", k)
