"""Block-wise absmax quantization of one tensor, and its inverse.

The tensor is flattened (row-major) and cut into blocks of B values; the last block may be shorter (a row of
172 values with B = 64 simply runs into the next row, exactly as bitsandbytes does it, so nothing is padded
and nothing is dropped). Each block stores one scale, absmax(block); each value stores the index of the
codebook entry nearest to value / scale.

Work is done in chunks of whole blocks so memory stays bounded for any tensor size. Speed (2 CPU cores is
the target): each chunk is divided by its scales into one reused buffer, its codes are read off a lookup
table indexed by the float's top bits (core/nearest.py: bit-identical to bucketize over the codebook
midpoints, ~10x faster), packed with uint8 shifts (core/pack.py) straight into the output, and decoding goes
through a per-byte table of values for k = 2, 4, 8. tests/test_core_equivalence.py holds all of it to a
plain reference implementation, bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kbitcli.core import codebooks
from kbitcli.core.nearest import NearestCodes
from kbitcli.core.pack import pack_into, packed_nbytes, unpack_u8
from kbitcli.core.scale_search import refit_scales, search_scales
from kbitcli.errors import bad_input
from kbitcli.io.dtypes import from_name

# Values per chunk: bounds peak memory whatever the tensor size. 2^18 keeps a chunk's working set (about
# 14 bytes per value across the reused buffers) within the L2 caches of two cores; measured: larger chunks
# are slower, and much smaller ones pay Python overhead per chunk.
CHUNK = 1 << 18
DQ_BLOCK = 256  # double quantization: blocks of 256 scales, 8-bit dynamic codes (bitsandbytes' choice)
SCALE_DTYPES = {name: from_name(name) for name in ("fp16", "bf16", "fp32")}  # what a block scale is stored in


@dataclass(frozen=True)
class Spec:
    """How one tensor is quantized. block_size is resolved to a number of values (see resolve_block)."""

    bits: int
    block_size: int
    dtype: str
    double_quant: bool = False
    scale_dtype: str = "fp16"
    scale_search: int = 1  # candidate scales per block (1 = plain absmax); see scale_search.py
    method: str = "rtn"  # rtn | gptq: how the codes were chosen (the decoder does not care); see core/gptq.py
    scale_refit: bool = False  # scales refit by least squares to the codes they gave, then coded again (scale_search.py)


@dataclass
class QuantizedTensor:
    spec: Spec
    shape: tuple[int, ...]
    orig_dtype: torch.dtype
    codes: torch.Tensor  # uint8, packed_nbytes(numel, bits)
    scales: torch.Tensor  # [n_blocks] in scale_dtype, or uint8 codes with double quant
    codebook: torch.Tensor  # float32 table the codes index
    scales_absmax: torch.Tensor | None = None  # double quant: fp32 [ceil(n_blocks / 256)]
    scales_offset: torch.Tensor | None = None  # double quant: fp32 [1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.spec.block_size)

    def effective_scales(self) -> torch.Tensor:
        """The fp32 scale of every block, as the decoder sees it."""
        if self.spec.double_quant:
            return dequantize_scales(self.scales, self.scales_absmax, self.scales_offset)
        return self.scales.float()


def resolve_block(block: int | str, shape: tuple[int, ...]) -> int:
    """'row' = one scale per output channel (a row of the stored matrix; for a conv weight [out, in/groups, *kernel]
    the flattened row of in/groups · kernel values), 'tensor' = one scale in all."""
    if block == "row":
        return int(math.prod(shape[1:])) if len(shape) > 1 else int(math.prod(shape))
    if block == "tensor":
        return int(math.prod(shape))
    return int(block)


def nearest(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry (codebook sorted ascending); ties go to the lower entry."""
    flat = normalized.reshape(-1).float().contiguous()
    return NearestCodes(codebook, flat.numel(), flat.numel())(flat).long().view(normalized.shape)


def _chunk_len(block: int) -> int:
    # whole blocks, and a multiple of 8 values so every chunk packs to whole bytes for any k
    blocks = max(1, CHUNK // block)
    blocks += (-blocks) % 8
    return blocks * block


def block_absmax(flat: torch.Tensor, block: int, name: str) -> torch.Tensor:
    """fp32 absmax of every block; refuses NaN/Inf (naming the tensor) instead of spreading them."""
    n = flat.numel()
    out = torch.empty(math.ceil(n / block))
    full = n // block * block
    if full:
        # max |x| = max(max x, -min x): one read of the values and no |x| copy (so no chunking needed);
        # abs() turns the -0.0 an all-zero block can give into 0.0, as |x| would
        # (two reductions: measured 9x faster than one torch.aminmax over rows of 64 on this CPU)
        blocks = flat[:full].reshape(-1, block)
        out[: full // block] = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()
    if full < n:
        out[-1] = flat[full:].float().abs().amax()
    # NaN propagates through max and an Inf becomes the absmax: checking the block maxima checks every value
    bad_blocks = (~torch.isfinite(out)).nonzero()
    if bad_blocks.numel():
        first = int(bad_blocks[0]) * block
        bad = first + int((~torch.isfinite(flat[first : first + block].float())).nonzero()[0])
        raise bad_input(
            f"tensor {name!r} holds NaN/Inf (first at flat index {bad}); fix or drop it, "
            f"or keep it dense with --override '{name}=skip'"
        )
    return out


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, rounded up where rounding to nearest went below: a scale never below its block's absmax.
    GPTQ's grid (kbit_grid.py) stores its scales so; data-free round-to-nearest does not (see quantize)."""
    s = x.to(dtype)
    below = s.float() < x
    if below.any():
        s = torch.where(below, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t, by one float64 sum (NaN and Inf propagate; no finite fp32 value can overflow it): what
    every reader checks a checkpoint's scales and tables with, never the codes. numpy's is the quicker call on
    the small scale tensors read per tensor (bf16 has no numpy type)."""
    if t.dtype == torch.bfloat16:
        return math.isfinite(t.sum(dtype=torch.float64).item())
    return math.isfinite(float(t.numpy().sum(dtype=np.float64)))


def check_scales(absmax: torch.Tensor, spec: Spec, name: str, up: bool = False) -> torch.Tensor:
    """The scales as stored (scale_dtype, rounded to nearest; `up`: rounded up, as GPTQ's grid stores them),
    refusing what that dtype cannot hold: an absmax past its largest value (overflow to Inf), or a non-zero
    block whose scale rounds to 0 (underflow: the block would decode to all zeros, silently)."""
    sdt = SCALE_DTYPES[spec.scale_dtype]
    if absmax.max() > torch.finfo(sdt).max:
        raise bad_input(
            f"tensor {name!r} has |w| up to {float(absmax.max()):.3g}, beyond {spec.scale_dtype} scales; "
            "set scale_dtype: fp32 (or bf16) in the recipe"
        )
    scales = round_up(absmax, sdt) if up else absmax.to(sdt)
    # underflow: below the dtype's normal range a scale loses precision (down to 0, or the smallest subnormal
    # far above the block's values), and the block would decode to zeros or garbage, silently
    lost = (absmax > 0) & ((scales == 0) | ((scales.float() - absmax).abs() > absmax * 2**-7))
    if lost.any():
        b = int(lost.nonzero()[0])
        raise bad_input(
            f"tensor {name!r}: block {b} has |w| up to {float(absmax[b]):.3g}, below what {spec.scale_dtype} scales "
            f"hold, so it would decode to zeros; set scale_dtype: fp32 (or bf16) in the recipe, or keep it dense "
            f"with --override '{name}=skip'"
        )
    return scales


def check_tensor(w: torch.Tensor, spec: Spec, name: str) -> None:
    """What quantize() refuses about a tensor's values, without quantizing it (for --dry-run): NaN/Inf and
    scales the stored dtype cannot hold."""
    flat = w.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        flat = flat.float()
    absmax = block_absmax(flat, spec.block_size, name)
    if not spec.double_quant:
        check_scales(absmax, spec, name)


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: subtract the mean, then 8-bit dynamic codes in blocks of 256 (fp32 absmax each)."""
    offset = absmax.mean().reshape(1)
    centered = absmax - offset
    table = _fixed_table("dynamic", 8)
    n = centered.numel()
    n2 = math.ceil(n / DQ_BLOCK)
    padded = torch.zeros(n2 * DQ_BLOCK)
    padded[:n] = centered
    amax2 = padded.view(n2, DQ_BLOCK).abs().amax(dim=1)
    safe = torch.where(amax2 > 0, amax2, torch.ones_like(amax2))
    codes = nearest((padded.view(n2, DQ_BLOCK) / safe[:, None]).reshape(-1), table)[:n]
    return codes.to(torch.uint8), amax2, offset


def dequantize_scales(codes: torch.Tensor, amax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    n = codes.numel()
    values = _fixed_table("dynamic", 8)[codes.long()]
    # each run of DQ_BLOCK scales times its own absmax, via a [runs, DQ_BLOCK] view of the zero-filled codes
    padded = torch.cat([values, values.new_zeros(-n % DQ_BLOCK)]).view(-1, DQ_BLOCK)
    return (padded * amax2[:, None] + offset).reshape(-1)[:n]


def quantize(w: torch.Tensor, spec: Spec, name: str = "tensor") -> QuantizedTensor:
    codebooks.check_bits(spec.bits)
    codebooks.check_dtype(spec.dtype)
    flat = w.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # the fp32 ops below would promote a wider input (fp64) and divide at its precision: round it first
        flat = flat.float()
    n, B = flat.numel(), spec.block_size
    if n == 0:
        raise bad_input(f"tensor {name!r} is empty; leave it out of the targets")
    absmax = block_absmax(flat, B, name)
    table = None
    if spec.scale_search > 1:
        table = _table(spec, flat, absmax, B)
        absmax = search_scales(flat, absmax, table, B, spec.scale_search, _chunk_len(B))
    if spec.scale_refit:
        if table is None:
            table = _table(spec, flat, torch.where(absmax > 0, absmax, torch.ones_like(absmax)), B)
        absmax = refit_scales(flat, absmax, table, B, _chunk_len(B))

    scales_absmax = scales_offset = None
    if spec.double_quant:
        scales, scales_absmax, scales_offset = quantize_scales(absmax)
        eff = dequantize_scales(scales, scales_absmax, scales_offset)
    else:
        scales = check_scales(absmax, spec, name)
        # Codes against the fp32 scale, stored rounded to nearest: for absmax these are bitsandbytes' own codes,
        # byte for byte, and the fp16 scale moves each decoded value by at most 2^-11 either way. Measured on the
        # model's loss (ΔNLL paired with bitsandbytes NF4 on the same windows): 0.9998x, 0.9998x and 1.0001x
        # (+-0.0001) on stories260K / SmolLM2 TinyStories / SmolLM2 WikiText; coding against the scale rounded
        # *up* (the rule before) scattered 0.991x, 1.002x and 1.008x (+-0.002): which weights crossed a code
        # boundary was chance. A refit scale is the least-squares fit to the codes, coded again against it as stored.
        eff = scales.float() if spec.scale_refit else absmax
    # a block of zeros keeps scale 0 and decodes to 0 whatever its codes; divide by 1 to avoid 0/0
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))

    if table is None:
        table = _table(spec, flat, safe, B)

    k, step = spec.bits, _chunk_len(B)
    codes = torch.empty(packed_nbytes(n, k), dtype=torch.uint8)
    to_codes = NearestCodes(table, n, step, reused=spec.dtype in codebooks.FIXED_DTYPES)
    normalized = torch.empty(min(n, step))  # reused by every chunk
    for start in range(0, n, step):
        x = flat[start : start + step]
        v = _per_block(x, safe[start // B :], B, torch.div, normalized[: x.numel()])
        # a chunk starts on a multiple of 8 values, so its codes fill whole bytes of the output
        pack_into(to_codes(v), k, codes[start * k // 8 : packed_nbytes(start + x.numel(), k)])
    return QuantizedTensor(spec, tuple(w.shape), w.dtype, codes, scales, table, scales_absmax, scales_offset)


def _table(spec: Spec, flat: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    if spec.dtype == "quantile":
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return codebooks.quantile_codebook(_normalized_sample(flat, safe, block), spec.bits)
    return _fixed_table(spec.dtype, spec.bits).clone()  # a copy: the cached one is shared


@functools.lru_cache(maxsize=None)
def _fixed_table(dtype: str, bits: int) -> torch.Tensor:
    """A fixed data type's table is the same for every tensor: build it once."""
    return codebooks.fixed_codebook(dtype, bits)


def _per_block(x: torch.Tensor, scales: torch.Tensor, block: int, op, out: torch.Tensor) -> torch.Tensor:
    """out = op(x, scale of x's block), in fp32, for a chunk x that starts on a block boundary (the last block
    may be short). Whole blocks go through one broadcast op on a [blocks, block] view."""
    full = x.numel() // block * block
    nb = full // block
    if nb:
        op(x[:full].view(nb, block), scales[:nb, None], out=out[:full].view(nb, block))
    if full < x.numel():
        op(x[full:], scales[nb], out=out[full:])
    return out


def _normalized_sample(flat: torch.Tensor, safe_scales: torch.Tensor, block: int, max_samples: int = 1 << 20):
    """Every stride-th value of the tensor divided by its block's scale (every value for up to 2^20)."""
    stride = max(1, math.ceil(flat.numel() / max_samples))
    if stride == 1:  # the same divisions, block by block, without gathering a scale per value
        return _per_block(flat, safe_scales, block, torch.div, torch.empty(flat.numel()))
    idx = torch.arange(0, flat.numel(), stride)
    return flat[idx].float() / safe_scales[idx // block]


@functools.lru_cache(maxsize=32)
def _code_values(codebook_bytes: bytes, k: int, check: bool) -> "_CodeValues":
    return _CodeValues(torch.frombuffer(bytearray(codebook_bytes), dtype=torch.float32), k, check)


def code_values(codebook: torch.Tensor, k: int, check: bool = True) -> "_CodeValues":
    """The (cached) decoder of codes into this codebook's values. check=False: the codes were checked already
    (check_codes, once when a k-bit module was loaded), so no scan for codes past the table's end per call."""
    return _code_values(codebook.float().numpy().tobytes(), k, check)


# The values of one byte's codes, viewed as one wide element, so that decoding a byte is a 1-D gather of one
# element (measured 2-4x faster than gathering rows of a [256, 8 / k] float table): k = 8: one float32;
# k = 4: two float32 = 8 bytes (int64); k = 2: four float32 = 16 bytes (complex128). Bits are copied as is.
_BYTE_ELEMENT = {1: torch.float32, 2: torch.int64, 4: torch.complex128}


class _CodeValues:
    """Codebook values of packed codes. For k = 2, 4 and 8 a byte holds whole codes, so one gather from a
    table of 256 byte values decodes a byte at once; other k unpack first, then gather."""

    def __init__(self, codebook: torch.Tensor, k: int, check: bool = True):
        self.k = k
        # codes past the table's end (int/fp tables have 2^k - 1 entries) exist only in a damaged file: NaN
        self.table = torch.full((2**k,), float("nan"))
        self.table[: codebook.numel()] = codebook
        self.check = check and codebook.numel() < 2**k
        self.per_byte = 8 // k if 8 // k in _BYTE_ELEMENT and 8 % k == 0 else None
        if self.per_byte:
            every_byte = torch.arange(256, dtype=torch.uint8)
            values = self.table[unpack_u8(every_byte, k, 256 * self.per_byte).long()]
            self.byte_values = values.view(_BYTE_ELEMENT[self.per_byte])  # [256] wide elements

    def __call__(self, packed: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
        """The first n values of packed (a run of whole code groups), into out (fp32, starting at its storage's
        start, with room for n rounded up to a whole byte's worth of codes); returns out[:n]."""
        if self.per_byte:
            wide = out[: packed.numel() * self.per_byte].view(self.byte_values.dtype)
            torch.index_select(self.byte_values, 0, packed.int(), out=wide)
        else:
            torch.index_select(self.table, 0, unpack_u8(packed, self.k, n).int(), out=out[:n])
        if self.check and torch.isnan(out[:n]).any():
            raise bad_input("a code points past the end of its codebook: the checkpoint is damaged "
                            "(`kbit inspect --verify` checks it against its manifest)")
        return out[:n]


def check_codes(qt: QuantizedTensor, name: str, chunk_groups: int = 1 << 17) -> None:
    """A k-bit module decodes its codes on every forward without this check (KbitLinear's byte table clamps,
    for speed): so a module built from a file checks once, on load, that no code points past the end of a
    2^k - 1 entry table (int, fp). Streams the codes in chunks of whole 8-code groups."""
    k = qt.spec.bits
    if qt.codebook.numel() >= 2**k:
        return
    bad, n, step = 2**k - 1, qt.numel, chunk_groups * k
    for b0 in range(0, qt.codes.numel(), step):
        count = min(n - b0 * 8 // k, chunk_groups * 8)
        part = qt.codes[b0: b0 + step][: packed_nbytes(count, k)]
        if bool((unpack_u8(part, k, count) == bad).any()):
            raise bad_input(f"tensor {name!r}: a code points past the end of its {qt.codebook.numel()}-entry "
                            "codebook: the checkpoint is damaged (`kbit inspect --verify` checks it against its manifest)")


def dequantize_range(qt: QuantizedTensor, start: int, stop: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values [start, stop) of the flattened tensor, decoding only the bytes that hold them."""
    k, B = qt.spec.bits, qt.spec.block_size
    a = start - start % 8  # 8 codes = k whole bytes: align down to a group boundary
    byte_a, byte_b = a * k // 8, packed_nbytes(stop, k)
    if scales is None:
        scales = qt.effective_scales()
    values = code_values(qt.codebook, k)(qt.codes[byte_a:byte_b], stop - a, torch.empty(stop - a + 8))[start - a :]
    if start % B == 0:
        return _per_block(values, scales[start // B :], B, torch.mul, torch.empty(stop - start))
    block_ids = torch.arange(start, stop) // B
    return values * scales[block_ids]


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k, B = qt.numel, qt.spec.bits, qt.spec.block_size
    out = torch.empty(n, dtype=dtype)
    scales = qt.effective_scales()
    step = _chunk_len(B)
    values = code_values(qt.codebook, k)
    buf = torch.empty(min(step, n + 8))  # reused by every chunk
    for start in range(0, n, step):
        stop = min(n, start + step)
        v = values(qt.codes[start * k // 8 : packed_nbytes(stop, k)], stop - start, buf)
        # value * scale in fp32 (then rounded to dtype), written straight into the output when it is fp32
        target = out[start:stop] if dtype == torch.float32 else v
        _per_block(v, scales[start // B :], B, torch.mul, target)
        if dtype != torch.float32:
            out[start:stop] = v
    return out.view(qt.shape)


def storage_bits(qt: QuantizedTensor, count_codebook: bool) -> int:
    """Bits this tensor occupies on disk: codes + scales (+ double-quant constants) (+ its own codebook)."""
    bits = qt.codes.numel() * 8 + qt.scales.numel() * qt.scales.element_size() * 8
    if qt.spec.double_quant:
        bits += (qt.scales_absmax.numel() + qt.scales_offset.numel()) * 32
    if count_codebook:
        bits += qt.codebook.numel() * 32
    return bits


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x̂)^2), in float64."""
    ref, approx = ref.double().reshape(-1), approx.double().reshape(-1)
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise)


def layout(spec: Spec, numel: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What quantize() will produce for a tensor of `numel` values, known before any work is done:
    component suffix -> (dtype, shape). The planner sizes shards and the file header from it."""
    n_blocks = math.ceil(numel / spec.block_size)
    out = {"codes": (torch.uint8, (packed_nbytes(numel, spec.bits),))}
    if spec.double_quant:
        out["scales"] = (torch.uint8, (n_blocks,))
        out["scales_absmax"] = (torch.float32, (math.ceil(n_blocks / DQ_BLOCK),))
        out["scales_offset"] = (torch.float32, (1,))
    else:
        out["scales"] = (SCALE_DTYPES[spec.scale_dtype], (n_blocks,))
    if spec.dtype == "quantile":
        out["codebook"] = (torch.float32, (2**spec.bits,))
    return out


def layout_bits(spec: Spec, numel: int) -> int:
    """On-disk bits of one quantized tensor (its own codebook included; shared tables are not)."""
    return sum(math.prod(shape) * dt.itemsize * 8 for dt, shape in layout(spec, numel).values())
