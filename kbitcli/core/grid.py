"""The grid one block of weights is rounded onto: value = offset + scale * levels[code].

Round-to-nearest and GPTQ (core/gptq.py) share it, so any data type and any format quantizes the same way:
`levels` is the sorted codebook (kbit's nf/fp/int/quantile/dynamic tables, or a format's integer levels),
`fit` chooses a block's scale (and offset) from its values, already rounded to what the file stores
(fp16, bf16, fp32, or the 8-bit double-quant grid), so the encoder's arithmetic is the decoder's.

Scale choice. `candidates` = 1 is plain absmax (with fp32 scales, bitsandbytes' NF4 codes; with fp16 the
grid codes against the stored scale, rounded up, where blockwise.quantize codes data-free blocks against
the fp32 absmax). With more candidates each block tries absmax * (1, 0.95, 0.90, ...) and keeps the one
with the least *weighted* squared error
sum_j imp_j (w_j - q_j)^2, where imp_j is the importance of the weight's input channel: E[x_j^2] over
calibration tokens (llama.cpp's imatrix) when there is calibration data, uniform otherwise. Uniform weights
minimise plain squared error, which measured worse than absmax on SmolLM2 (issue 8): a block's largest
weight is the one the model leans on most, and clipping it costs more loss than the rest of the block gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

STEP = 0.05  # candidate scales: base * (1 - STEP * i), i = 0 .. candidates - 1


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    return (levels[1:] + levels[:-1]) / 2


def nearest_level(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (levels sorted ascending); a tie goes to the lower level, as kbit's
    encoder does (core/nearest.py)."""
    return torch.bucketize(x, mids)


@dataclass
class Grid:
    """levels: sorted fp32 table; round_scale(s, block_ids) -> the stored scale as the decoder reads it;
    kind: 'absmax' (scale = max |w|, offset 0: kbit, bitsandbytes, Q8_0), 'signed' (scale = the signed value
    of largest magnitude, offset 0: Q4_0 / Q5_0, whose levels are asymmetric), 'minmax' (offset = min,
    scale = (max - min) / top level: Q4_1 / Q5_1); norm: the level the base value maps to (1 for [-1, 1]
    tables, 127 for Q8_0's integer levels, ...)."""

    levels: torch.Tensor
    round_scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    candidates: int = 1
    kind: str = "absmax"
    norm: float = 1.0
    round_offset: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        self.levels = self.levels.float()
        self.mids = midpoints(self.levels)

    def fit(self, x: torch.Tensor, weight: torch.Tensor | None, block_ids: torch.Tensor):
        """x: [blocks, B] values (a short block padded with copies of its own values and weight 0);
        weight: [blocks, B] importance or None; returns (scale [blocks], offset [blocks] or None)."""
        offset = None
        if self.kind == "minmax":
            lo, hi = x.amin(1), x.amax(1)
            offset = self.round_offset(lo) if self.round_offset else lo
            base = (hi - offset) / self.norm
        elif self.kind == "signed":
            idx = x.abs().argmax(1, keepdim=True)
            base = x.gather(1, idx).squeeze(1) / self.norm
        else:
            base = x.abs().amax(1) / self.norm
        if self.candidates == 1:
            return self.round_scale(base, block_ids), offset
        best_s = best_err = None
        for i in range(self.candidates):
            s = self.round_scale(base * (1 - STEP * i), block_ids)
            err = (x - self.values(self.codes(x, s[:, None], offset), s[:, None], offset)).pow_(2)
            err = (err * weight if weight is not None else err).sum(1)
            if best_err is None:
                best_s, best_err = s, err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
        return best_s, offset

    def refit(self, x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, block_ids: torch.Tensor,
              rounds: int = 2) -> torch.Tensor:
        """Weighted least-squares refit of each block's scale (offset-free grids): s = Σ w·x·v / Σ w·v² for the
        levels v the block's codes take, then stored-rounded; a block keeps it only where its weighted error
        falls, and the step is repeated with the new codes. The candidate search above only shrinks absmax in 5%
        steps; this moves each scale to where its codes want it, under the same importance. Measured with
        --calib (Wikipedia, scored on TinyStories, B64): nf4 ΔNLL 0.95x the search alone on stories260K and
        0.91x on SmolLM2-135M (KL 0.99x / 0.96x); nf3 0.98x and 0.81x (KL 0.97x / 0.87x) (docs/CALIBRATION.md)."""
        def levels_and_error(s):  # the levels the block's codes take at scale s, and its weighted error
            v = self.levels[self.codes(x, s[:, None], None)]
            return v, ((x - v * s[:, None]).pow_(2) * weight).sum(1)

        v, err = levels_and_error(scale)
        for _ in range(rounds):
            num, den = (weight * x * v).sum(1), (weight * v * v).sum(1)
            fit = self.round_scale(torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), scale),
                                   block_ids)
            v_fit, e = levels_and_error(fit)
            better = e < err
            scale, err, v = torch.where(better, fit, scale), torch.where(better, e, err), torch.where(better[:, None], v_fit, v)
        return scale

    def codes(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))  # a zero scale decodes to 0 anyway
        if offset is not None:
            offset = offset[:, None] if offset.dim() < x.dim() else offset
            x = x - offset
        return nearest_level(x / safe, self.mids)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        v = self.levels[codes] * scale
        if offset is not None:
            v = v + (offset[:, None] if offset.dim() < v.dim() else offset)
        return v


def storage_rounding(scale_dtype: torch.dtype) -> Callable:
    """Scales stored as fp16 / bf16 / fp32, rounded up (blockwise.round_up: never below the absmax GPTQ's
    error updates start from): the decoder reads them back as fp32."""
    from kbitcli.core.blockwise import round_up

    return lambda s, _ids: round_up(s, scale_dtype).float()


def dq_rounding(scale_codes_table: torch.Tensor, amax2: torch.Tensor, offset: torch.Tensor) -> Callable:
    """Double-quantized scales: the 8-bit grid (offset, one absmax per 256 blocks) is fixed up front from the
    round-to-nearest scales of the original weights; a scale GPTQ chooses later is rounded onto that grid
    (the same fp32 arithmetic as blockwise.dequantize_scales). Returns s -> (rounded value); its `codes_of`
    gives the 8-bit codes the file stores."""
    from kbitcli.core.blockwise import DQ_BLOCK

    table = scale_codes_table.float()
    mids = midpoints(table)

    def codes_of(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a2 = amax2[ids // DQ_BLOCK]
        return nearest_level((s - offset) / torch.where(a2 > 0, a2, torch.ones_like(a2)), mids)

    def rnd(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table[codes_of(s, ids)] * amax2[ids // DQ_BLOCK] + offset

    rnd.codes_of = codes_of
    return rnd
