"""kbit's own grid for a tensor (its Spec), and GPTQ / weighted-RTN results turned into a QuantizedTensor.

Only which codes and scales are stored changes: the result decodes with blockwise.dequantize like any other.
"""

from __future__ import annotations

import torch

from kbitcli.core.blockwise import (SCALE_DTYPES, QuantizedTensor, Spec, _fixed_table, _table, block_absmax,
                                    check_scales, dequantize_scales, quantize_scales)
from kbitcli.core.gptq import gptq, rtn
from kbitcli.core.grid import Grid, dq_rounding, storage_rounding
from kbitcli.core.pack import pack_into, packed_nbytes
from kbitcli.errors import bad_input


class KbitGrid:
    """The grid of one tensor under `spec`: its codebook (a quantile table comes from the tensor's own
    absmax-normalised values, as round-to-nearest makes it), and its scale rounding (fp16/bf16/fp32, or the
    double-quant grid fixed from the round-to-nearest absmax)."""

    def __init__(self, w: torch.Tensor, spec: Spec, name: str, candidates: int):
        flat = w.reshape(-1).float()
        B = spec.block_size
        absmax = block_absmax(flat, B, name)
        self.spec = spec
        self.dq = None
        if spec.double_quant:
            codes, amax2, offset = quantize_scales(absmax)
            self.dq = (amax2, offset)
            rounding = dq_rounding(_fixed_table("dynamic", 8), amax2, offset)
            eff = dequantize_scales(codes, amax2, offset)
        else:
            sdt = SCALE_DTYPES[spec.scale_dtype]
            # GPTQ's error updates can push a block past the source's absmax; allow the headroom of clipping
            if absmax.max() * 1.5 > torch.finfo(sdt).max:
                raise bad_input(f"tensor {name!r} has |w| up to {float(absmax.max()):.3g}, beyond {spec.scale_dtype} "
                                "scales; set scale_dtype: fp32 (or bf16) in the recipe")
            rounding = storage_rounding(sdt)
            eff = check_scales(absmax, spec, name, up=True).float()
        # a quantile table comes from the values over the scales coded against (quantize(): the fp32 absmax)
        safe = torch.where(eff > 0, eff, torch.ones_like(eff))
        self.table = _table(spec, flat, safe, B)  # codes index this table (sorted ascending)
        self.rounding = rounding
        # a table of 2^k - 1 entries (int, fp) is indexed by codes 0 .. len - 1, never past its end
        self.grid = Grid(self.table, rounding, candidates=candidates)

    def to_quantized(self, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> QuantizedTensor:
        spec, n = self.spec, codes.numel()
        packed = torch.empty(packed_nbytes(n, spec.bits), dtype=torch.uint8)
        step = 1 << 20  # a multiple of 8 codes: whole bytes for every k
        for start in range(0, n, step):
            stop = min(n, start + step)
            pack_into(codes[start:stop].to(torch.uint8), spec.bits, packed[start * spec.bits // 8 : packed_nbytes(stop, spec.bits)])
        if self.dq is not None:
            amax2, offset = self.dq
            ids = torch.arange(scale.numel())
            scodes = self.rounding.codes_of(scale, ids).to(torch.uint8)
            assert torch.equal(dequantize_scales(scodes, amax2, offset), scale)  # the grid GPTQ rounded on
            return QuantizedTensor(spec, tuple(w.shape), w.dtype, packed, scodes, self.table, amax2, offset)
        stored = scale.to(SCALE_DTYPES[spec.scale_dtype])
        return QuantizedTensor(spec, tuple(w.shape), w.dtype, packed, stored, self.table)


def as_matrix(w: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The [out, in] matrix GPTQ works on: a linear weight as stored; a GPT-2 Conv1D weight [in, out] is
    transposed for the work (its flat blocks are then cut from the transposed matrix, see to_stored)."""
    return w.t() if transposed else w.reshape(w.shape[0], -1)


def quantize_gptq(w: torch.Tensor, spec: Spec, name: str, H: torch.Tensor, *, damp: float = 0.01,
                  act_order: bool = False, candidates: int = 1, refit: bool = True, refine: int = 1) -> QuantizedTensor:
    """GPTQ for one weight [out, in...] (conv weights flattened to [out, in*kh*kw]); H over its inputs."""
    g = KbitGrid(w, spec, name, candidates)
    W = w.reshape(w.shape[0], -1)
    if H.shape[0] != W.shape[1]:
        raise ValueError(f"{name}: Hessian {tuple(H.shape)} does not fit weight {tuple(W.shape)}")
    codes, scale, _ = gptq(W, H, spec.block_size, g.grid, damp=damp, act_order=act_order, refit=refit,
                          refine=refine)
    return g.to_quantized(w, codes, scale)


def quantize_weighted(w: torch.Tensor, spec: Spec, name: str, importance: torch.Tensor | None,
                      candidates: int) -> QuantizedTensor:
    """Round-to-nearest with each block's scale chosen among `candidates` to minimise the importance-weighted
    squared error (importance None: plain squared error)."""
    g = KbitGrid(w, spec, name, candidates)
    codes, scale, _ = rtn(w.reshape(w.shape[0], -1), spec.block_size, g.grid, importance)
    return g.to_quantized(w, codes, scale)
