"""KbitLinear: a linear layer whose weight stays k-bit in memory and is dequantized per forward, in chunks.

The module holds exactly what the checkpoint stores for the weight (packed codes, per-block scales, the
double-quant constants, the codebook) as buffers; there is no full-precision weight anywhere. forward()
decodes a slab of whole rows at a time (slabs start on block boundaries, so each slab is a plain
[blocks, B] multiply), runs the matmul for that slab in the input's dtype and drops the slab: peak extra
memory is one slab, whatever the layer size.

Decoding is one gather: k = 8 indexes the codebook with the bytes; k = 4 and 2 index a 256-entry table
of whole decoded bytes (see byte_table); other k unpack first (`core.pack.unpack`). Modules with the same
codebook share the codebook and the byte table (`share_tables`).

`transposed=True` is for GPT-2's Conv1D, whose stored weight is [in, out] and computes x @ W + b.

Small batches (token-by-token generation: a few rows of x) skip the slabs: the fused CPU kernel
(core/matvec.py) multiplies straight from the packed codes, reading 1/8 of fp32's bytes at k = 4 where the
slab path writes and re-reads a full fp32 copy. It serves forwards whose input needs no gradient, on CPU, with
at most `kernel_max_rows` rows of x (the measured crossover: beyond it decoding once per slab and one sgemm
win). Without the kernel (KBIT_KERNEL=0, no C compiler) everything takes the slab path.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.core import codebooks, matvec
from kbitcli.core.blockwise import DQ_BLOCK, QuantizedTensor, Spec, dequantize_range
from kbitcli.core.pack import unpack

SLAB_VALUES = 1 << 18  # values decoded per slab (1 MB of fp32): bounds the transient, amortises ~12 small ops per slab
# Rows of x up to which the fused kernel beats decode-by-slabs + sgemm, per k (docs/SPEED.md: measured on a
# SmolLM2-135M MLP shape, 1 thread, AVX2). Both sides are compiled code (the slabs are decoded by the same
# library's kbit_decode), so the kernel wins only while one decode serves every row of x: up to 8 (one group
# of rows), fewer for k = 2, 3, whose multi-row walk extracts codes that straddle bytes.
KERNEL_MAX_ROWS = {2: 4, 3: 4, 4: 8, 5: 8, 6: 8, 7: 8, 8: 8}
DERIVED = ("_packed", "_slabs", "_flat", "_values")  # caches in a k-bit module's __dict__, rebuilt on use


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n k-bit codes of a packed byte run (starting on a code boundary), as int32 for index_select.
    k = 8, 4, 2: plain shifts of the bytes (each byte holds 8/k whole codes); other k: core.pack.unpack."""
    if bits == 8:
        return packed[:n].int()
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (8 - bits * (i + 1))) & mask for i in range(per)]  # MSB-first within the byte
        return torch.stack(parts, 1).view(-1)[:n].int()
    return unpack(packed, bits, n).int()


WIDE = {4: torch.float64, 2: torch.complex128}  # a dtype as wide as the 8/k fp32 values one byte decodes to


def byte_table(codebook: torch.Tensor, bits: int) -> torch.Tensor | None:
    """For k = 4 and 2: [256] table whose entry b holds, bit for bit, the 8/k fp32 codebook values of the codes
    packed in byte b, typed as one wide element (float64 / complex128). A 1-D index_select over it followed by
    .view(float32) decodes a byte run in one gather (a 2-D [256, 8/k] gather is ~20x slower in torch)."""
    if bits not in WIDE:
        return None
    codes = unpack_codes(torch.arange(256, dtype=torch.uint8), bits, 256 * 8 // bits).long()
    table = codebook.float()[codes.clamp(max=codebook.numel() - 1)]  # fp has 2^k - 1 entries; code 2^k-1 never occurs
    return table.view(256, 8 // bits).contiguous().view(WIDE[bits]).reshape(256)


@functools.lru_cache(maxsize=None)
def _scale_table(device: torch.device) -> torch.Tensor:
    """The 8-bit dynamic table double-quantized scales index (a constant: built once per device)."""
    return codebooks.dynamic_codebook(8).to(device)


class KbitLinear(nn.Module):
    def __init__(self, spec: Spec, shape: tuple[int, int], orig_dtype: torch.dtype, codes: torch.Tensor,
                 scales: torch.Tensor, codebook: torch.Tensor, scales_absmax: torch.Tensor | None = None,
                 scales_offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 transposed: bool = False, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"KbitLinear needs a 2-D weight, got shape {tuple(shape)}")
        self.spec = spec
        self.shape = tuple(int(s) for s in shape)  # as stored: [out, in], or [in, out] when transposed
        self.orig_dtype = orig_dtype
        self.transposed = transposed
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = (self.shape[0], self.shape[1]) if transposed else (self.shape[1], self.shape[0])
        self.register_buffer("codes", codes.reshape(-1).to(torch.uint8))
        self.register_buffer("scales", scales.reshape(-1))
        self.register_buffer("codebook", codebook.float())
        self.register_buffer("scales_absmax", None if scales_absmax is None else scales_absmax.float())
        self.register_buffer("scales_offset", None if scales_offset is None else scales_offset.float())
        # derived from the codebook, not checkpoint state: 2 KB (k=4) / 4 KB (k=2), shared by modules alike
        self.register_buffer("lut", byte_table(self.codebook, spec.bits), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None, transposed: bool = False,
                       compute_dtype: torch.dtype | None = None) -> "KbitLinear":
        return cls(qt.spec, qt.shape, qt.orig_dtype, qt.codes, qt.scales, qt.codebook, qt.scales_absmax,
                   qt.scales_offset, bias, transposed, compute_dtype)

    def quantized_tensor(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor view of this module's buffers (no copy)."""
        return QuantizedTensor(self.spec, self.shape, self.orig_dtype, self.codes, self.scales, self.codebook,
                               self.scales_absmax, self.scales_offset)

    def __getstate__(self):
        # caches derived from the buffers (the kernel's ctypes view, slab plans, decoders) are rebuilt on use;
        # dropping them lets copy.deepcopy and pickling copy the module
        return {k: v for k, v in self.__dict__.items() if k not in DERIVED}

    # ---- decoding -------------------------------------------------------------------------------------
    def _block_scales(self, b0: int, b1: int) -> torch.Tensor:
        """fp32 scales of blocks [b0, b1) (double quant decoded for just those blocks)."""
        if self.scales_absmax is None:
            return self.scales[b0:b1].float()
        table = _scale_table(self.scales_absmax.device)
        idx = torch.arange(b0, b1, device=self.scales.device) // DQ_BLOCK
        return table[self.scales[b0:b1].long()] * self.scales_absmax[idx] + self.scales_offset

    def _values(self, start: int, stop: int) -> torch.Tensor:
        """Codebook values (before scaling) of flat positions [start, stop); start is a multiple of 8."""
        k = self.spec.bits
        byte_a, byte_b = start * k // 8, (stop * k + 7) // 8
        packed = self.codes[byte_a:byte_b]
        if self.lut is not None:
            return self.lut.index_select(0, packed.int()).view(torch.float32)[: stop - start]
        return self.codebook.index_select(0, unpack_codes(packed, k, stop - start))

    def dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        """fp32 rows [r0, r1) of the stored matrix (the compiled decoder on CPU, else torch's; the same values)."""
        lib = matvec.kernel() if self.codes.is_cpu else None
        if lib is not None:
            return self.packed_weight().decode_rows(lib, r0, r1)
        return self.dequantize_rows_torch(r0, r1)

    def dequantize_rows_torch(self, r0: int, r1: int) -> torch.Tensor:
        """fp32 rows [r0, r1) of the stored matrix, decoded by torch ops."""
        cols, B = self.shape[1], self.spec.block_size
        start, stop = r0 * cols, r1 * cols
        if start % B or start % 8:  # not on a block boundary: the general (slower) path
            return dequantize_range(self.quantized_tensor(), start, stop).view(r1 - r0, cols)
        values = self._values(start, stop)
        scales = self._block_scales(start // B, math.ceil(stop / B))
        n = stop - start
        full = n // B * B
        if full:
            values[:full].view(-1, B).mul_(scales[: full // B, None])  # values is a fresh tensor: scale in place
        if full < n:
            values[full:].mul_(scales[-1])
        return values.view(r1 - r0, cols)

    def slabs(self) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) that cover the stored matrix; each starts on a block boundary when possible."""
        cached = self.__dict__.get("_slabs")
        if cached is None or cached[0] != SLAB_VALUES:
            self.__dict__["_slabs"] = cached = (SLAB_VALUES, self._plan_slabs())
        return cached[1]

    def _plan_slabs(self) -> list[tuple[int, int]]:
        rows, cols, B = self.shape[0], self.shape[1], self.spec.block_size
        need = B * 8 // math.gcd(B, 8)  # a slab must start on a block and on a byte-group (8 codes) boundary
        align = need // math.gcd(cols, need)  # rows per aligned step
        if align >= rows:
            return [(0, rows)]
        per = max(align, SLAB_VALUES // max(cols, 1) // align * align)
        return [(r, min(rows, r + per)) for r in range(0, rows, per)]

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight as [out, in] in `dtype` (a fresh tensor; for tests, export and debugging)."""
        w = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        for r0, r1 in self.slabs():
            w[r0:r1] = self.dequantize_rows(r0, r1).to(dtype)
        return w.t() if self.transposed else w

    # ---- compute --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and self.compute_dtype in (None, torch.float32):
            # fp32 at batch 1 (token-by-token decode: ~200 calls a token) goes straight to the kernel: what
            # _forward computes, in as few Python and torch calls as it takes (each ~0.1-2 us; on a small layer
            # they, not the kernel, are the cost, and nn.Linear is the bar)
            use = self._use_kernel(x)
            if use is not None:
                out = use[0].matmul(use[1], x)
                return out if self.bias is None else out.add_(self.bias)
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        return self._forward(x.to(dtype), dtype).to(in_dtype)

    def packed_weight(self) -> matvec.PackedWeight:
        """The kernel's view of this module's buffers (rebuilt when a buffer was replaced, e.g. by .to())."""
        b = self._buffers  # not self.codes: nn.Module's __getattr__ costs ~0.3 us a lookup, on every forward
        key = (b["codes"].data_ptr(), b["scales"].data_ptr(), b["codebook"].data_ptr())
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            dq = _scale_table(self.scales.device) if self.scales_absmax is not None else None
            pw = matvec.PackedWeight(self.codes, self.shape, self.spec.bits, self.spec.block_size, self.codebook,
                                     self.scales, self.scales_absmax, self.scales_offset, self.transposed, dq)
            pw.kernel_numel = self.kernel_max_rows() * self.in_features  # the batch-size crossover, in values
            self.__dict__["_packed"] = cached = (key, pw)
        return cached[1]

    def kernel_max_rows(self) -> int:
        return KERNEL_MAX_ROWS.get(self.spec.bits, 0)

    def _use_kernel(self, x: torch.Tensor) -> tuple[matvec.PackedWeight, ctypes.CDLL] | None:
        """(the kernel's view of this weight, the kernel library) when the kernel should compute this forward,
        else None."""
        if not matvec.ENABLED or not x.is_cpu:
            return None
        pw = self.packed_weight()
        # past the crossover, or finetuning (also under FrozenKbitMatmul's no_grad forward): the slab path
        if x.numel() > pw.kernel_numel or x.requires_grad:
            return None
        lib = matvec.kernel()
        return None if lib is None else (pw, lib)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        use = self._use_kernel(x)
        if use is not None:
            out = use[0].matmul(use[1], x).to(dtype)
            return out if self.bias is None else out.add_(self.bias.to(dtype))
        slabs = self.slabs()
        bias = None if self.bias is None else self.bias.to(dtype)
        if not self.transposed:
            if len(slabs) == 1:
                return F.linear(x, self.dequantize_rows(*slabs[0]).to(dtype), bias)
            out = x.new_empty(*x.shape[:-1], self.out_features)
            for r0, r1 in slabs:  # a slab of output features
                out[..., r0:r1] = F.linear(x, self.dequantize_rows(r0, r1).to(dtype),
                                           None if bias is None else bias[r0:r1])
            return out
        # Conv1D: stored rows are input features; each slab adds its share of every output
        out = None
        for r0, r1 in slabs:
            part = torch.matmul(x[..., r0:r1], self.dequantize_rows(r0, r1).to(dtype))
            out = part if out is None else out.add_(part)
        return out if bias is None else out.add_(bias)

    # ---- accounting -----------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes this module keeps resident: its buffers and bias (a shared table counted once here)."""
        seen, total = set(), 0
        for t in list(self.buffers()) + list(self.parameters()):
            key = (t.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    def bits_per_param(self) -> float:
        """Stored bits of codes + scales (+ double-quant constants) per weight value."""
        n = math.prod(self.shape)
        bits = self.codes.numel() * 8 + self.scales.numel() * self.scales.element_size() * 8
        if self.scales_absmax is not None:
            bits += (self.scales_absmax.numel() + self.scales_offset.numel()) * 32
        return bits / n

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"k={s.bits}, block={s.block_size}, dtype={s.dtype}{'+dq' if s.double_quant else ''}"
                + (", transposed" if self.transposed else ""))


def share_tables(modules) -> None:
    """Let KbitLinear modules with equal codebooks share one codebook and byte table (on a small model one
    table per layer would be a visible part of resident memory)."""
    shared: dict[tuple, tuple] = {}
    for m in modules:
        key = (m.spec.bits, m.codebook.device, tuple(m.codebook.tolist()))
        m.codebook, m.lut = shared.setdefault(key, (m.codebook, m.lut))
