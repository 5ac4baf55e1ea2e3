"""Nearest codebook entry, exactly as torch.bucketize finds it, but an order of magnitude faster.

The rule (docs/FORMAT.md): the code of a value v is the number of midpoints between neighbouring (sorted)
codebook entries that lie strictly below v, so a value exactly on a midpoint takes the lower entry. That is
`torch.bucketize(v, mids)`, which does a binary search per value and manages ~15 M values/s on a core: it
was the slowest step of quantization by far (the rest is a few memory-bound passes at >500 M values/s).

Instead we look the answer up. The top 17 bits of a float32 (the sign, the 8 exponent bits and the top 8
mantissa bits) name a "cell": all floats sharing them lie in one interval of the number line, 1/256 of a
power of two wide. The code is monotone in v, so every value of cell c has a code between the codes of the
cell's first and last float, and because cells are so narrow that range is one code or two neighbours. With
    lo[c]    = the smallest code in cell c,
    thr_j[c] = the (j+1)-th midpoint from entry lo[c] up (+inf past the end),
the code is  lo[c] + sum_j (v > thr_j[c])  — the very comparisons bucketize makes, so the result is
bit-identical for every float (±0, subnormals and ±inf included). Cost per value: a shift, a mask, one
gather per table and one compare-and-add per threshold (one threshold for every built-in table).

Building the tables costs ~3 ms (2^17 cells): fixed codebooks' are built once and cached, a one-off table
(quantile type) gets them only for a large tensor, and a table whose cells would need many thresholds (a
degenerate quantile table with near-equal entries) falls back to bucketize.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch

CELL_SHIFT = 15  # float32 bits below the cell index: 17-bit cells (sign, exponent, top 8 mantissa bits)
CELLS = 1 << (32 - CELL_SHIFT)
MAX_THRESHOLDS = 4  # beyond this many compare passes, bucketize is as fast: use it
LOOKUP_MIN_VALUES = 1 << 17  # building a table (~3 ms) costs what bucketize spends on ~100K values
_CACHE: OrderedDict[bytes, "CodeLookup | None"] = OrderedDict()
_CACHE_SIZE = 32  # every fixed table (4 types x 7 k) fits; each is ~0.6 MB
_CACHE_LOCK = threading.Lock()


def midpoints(codebook: torch.Tensor) -> torch.Tensor:
    return (codebook[1:] + codebook[:-1]) / 2


class CodeLookup:
    """The per-cell tables of one sorted codebook (see the module docstring)."""

    def __init__(self, lo: torch.Tensor, thresholds: list[torch.Tensor]):
        self.lo = lo  # uint8 [CELLS]
        self.thresholds = thresholds  # float32 [CELLS] each

    @classmethod
    def build(cls, codebook: torch.Tensor) -> "CodeLookup | None":
        mids = midpoints(codebook.float())
        if mids.numel() > 255:
            return None
        ascending, low_end, high_end = _cell_ends()
        # On sorted values, code(e) = #mids < e is a running count of where the midpoints fall: a few
        # binary searches for the midpoints instead of one per end point.
        first_above = torch.searchsorted(ascending, mids, right=True)  # ascending[i] > mid  <=>  i >= first_above
        codes = torch.bincount(first_above, minlength=ascending.numel() + 1).cumsum(0)
        lo, hi = codes[low_end], codes[high_end]
        span = int((hi - lo).max())
        if span > MAX_THRESHOLDS:
            return None
        padded = torch.cat([mids, torch.full((span,), float("inf"))])
        return cls(lo.to(torch.uint8), [padded[lo + j].contiguous() for j in range(span)])

    def codes(self, v: torch.Tensor, out: torch.Tensor, cell: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
        """v: contiguous float32 [n]; out: uint8 [n]; cell (int32 [n]) and above (bool [n]): scratch buffers."""
        torch.bitwise_right_shift(v.view(torch.int32), CELL_SHIFT, out=cell)
        cell.bitwise_and_(CELLS - 1)  # the arithmetic shift smeared the sign bit: keep the 17 cell bits
        torch.index_select(self.lo, 0, cell, out=out)
        for thr in self.thresholds:
            torch.gt(v, torch.index_select(thr, 0, cell), out=above)
            out.add_(above)
        return out


@functools.lru_cache(maxsize=1)
def _cell_ends() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first and last float of every cell, sorted ascending, and each cell's lowest / highest one's position
    in that order. Depends on no table: built once (3 MB)."""
    cell = torch.arange(CELLS, dtype=torch.int64)
    bits = torch.stack([cell << CELL_SHIFT, (cell << CELL_SHIFT) | ((1 << CELL_SHIFT) - 1)], dim=1).reshape(-1)
    ends = bits.to(torch.int32).view(torch.float32)  # the int32 wrap puts the sign bit in, as floats want
    # the cells past ±inf hold NaNs, which never get here (quantize refuses them): give them inf's code
    ends = torch.where(ends.isnan(), torch.copysign(torch.tensor(float("inf")), ends), ends)
    # in bit order the positive floats ascend and the negative ones descend: flip the negative half
    n, half = ends.numel(), ends.numel() // 2
    ascending = torch.cat([ends[half:].flip(0), ends[:half]])
    flat = torch.arange(n)
    position = torch.where(flat < half, flat + half, n - 1 - flat).view(CELLS, 2)
    return ascending, position.amin(dim=1), position.amax(dim=1)


def lookup_for(codebook: torch.Tensor, build: bool, keep: bool) -> CodeLookup | None:
    """The cached lookup of this table; else, if `build`, a new one (cached if `keep`); else None (bucketize)."""
    key = codebook.float().numpy().tobytes()
    with _CACHE_LOCK:  # encode quantizes on several threads
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    if not build:
        return None
    found = CodeLookup.build(codebook)
    if keep:
        with _CACHE_LOCK:
            _CACHE[key] = found
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return found


class NearestCodes:
    """Codes of many chunks against one codebook, reusing its scratch buffers (no allocation per chunk)."""

    def __init__(self, codebook: torch.Tensor, numel: int, chunk: int, reused: bool = False):
        """reused: the table will serve other tensors too (a fixed data type): build its lookup and keep it."""
        self.mids = midpoints(codebook)
        self.lookup = lookup_for(codebook, build=reused or numel >= LOOKUP_MIN_VALUES, keep=reused)
        size = min(numel, chunk)
        self.out = torch.empty(size, dtype=torch.uint8)
        if self.lookup is not None:
            self.cell = torch.empty(size, dtype=torch.int32)
            self.above = torch.empty(size, dtype=torch.bool)
        else:
            self.wide = torch.empty(size, dtype=torch.int32)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """uint8 codes of the contiguous float32 values v (a view of an internal buffer: use it before the next call)."""
        n = v.numel()
        if self.lookup is not None:
            return self.lookup.codes(v, self.out[:n], self.cell[:n], self.above[:n])
        torch.bucketize(v, self.mids, out_int32=True, out=self.wide[:n])
        return self.out[:n].copy_(self.wide[:n])
