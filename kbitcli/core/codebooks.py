"""Codebooks: the 2^k (or fewer) values in [-1, 1] that a k-bit code can stand for.

Every data type of the paper (Dettmers & Zettlemoyer 2023, section 3) is a sorted table of values; a weight
is stored as the index of the table entry nearest to weight / absmax(block). Building the table is the only
thing that differs between data types, so quantizing and decoding never branch on the type.

Tables are built in float64 and returned as float32, sorted ascending, without duplicates (symmetric int and
float have one value fewer than 2^k: there is no -0 and no asymmetric extra code).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from kbitcli.errors import bad_input

DTYPES = ("int", "fp", "nf", "quantile", "dynamic")
# data types whose table depends only on k (stored once per file); `quantile` is per tensor
FIXED_DTYPES = ("int", "fp", "nf", "dynamic")
MIN_BITS, MAX_BITS = 2, 8

# Exponent bits of the float type per k (the paper's recommended split: 2,2,3,3,4,4 for k = 3..8).
# k = 2 has room for sign + one bit; with an exponent bit it gives {-1, 0, 1}.
FP_EXPONENT_BITS = {2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4}


def check_bits(k: int) -> None:
    if not isinstance(k, int) or not MIN_BITS <= k <= MAX_BITS:
        raise bad_input(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {k!r}")


def _finish(values) -> torch.Tensor:
    t = torch.tensor(sorted(set(float(v) for v in values)), dtype=torch.float64)
    return (t / t.abs().max()).to(torch.float32)


def int_codebook(k: int) -> torch.Tensor:
    """Symmetric integer grid: [-(2^(k-1)-1) .. 2^(k-1)-1] / (2^(k-1)-1); int8 = [-127..127]/127."""
    m = 2 ** (k - 1) - 1
    return _finish(range(-m, m + 1))


def fp_codebook(k: int) -> torch.Tensor:
    """Sign / exponent / mantissa float without NaN or Inf, exponent bias 2^(E-1), subnormals at e = 0."""
    e_bits = FP_EXPONENT_BITS[k]
    m_bits = k - 1 - e_bits
    bias = 2 ** (e_bits - 1)
    mags = []
    for e in range(2**e_bits):
        for m in range(2**m_bits):
            frac = m / 2**m_bits
            mags.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    return _finish([s * v for v in mags for s in (1, -1)])


def nf_codebook(k: int) -> torch.Tensor:
    """NormalFloat (QLoRA): quantiles of N(0,1), asymmetric so that 0 is exact and 2^(k-1) values are > 0.

    The outer probability `offset` is the mean of 1 - 1/(2(2^k - 1)) and 1 - 1/(2 * 2^k), which is
    bitsandbytes' 0.9677083 at k = 4; with it the k = 4 table equals bitsandbytes' NF4 table.
    """
    n = 2**k
    # QLoRA publishes the offset to 7 decimals (0.9677083); probabilities, quantiles and the normalisation
    # are float32, exactly as bitsandbytes builds NF4, so the k = 4 table is bit-identical to its table
    offset = round(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))), 7)
    ppf = NormalDist().inv_cdf
    pos = [ppf(float(p)) for p in torch.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-ppf(float(p)) for p in torch.linspace(offset, 0.5, n // 2)[:-1]]
    t = torch.sort(torch.tensor(pos + neg + [0.0], dtype=torch.float32)).values
    return t / t.max()


def dynamic_codebook(k: int) -> torch.Tensor:
    """Dynamic exponent type (Dettmers 2016; bitsandbytes `create_dynamic_map` with total_bits = k).

    Sign, then a run of zero bits giving a base-10 exponent, an indicator bit, and a linear fraction in
    the remaining bits; plus 0 and 1. At k = 8 it equals bitsandbytes' signed 8-bit dynamic map.
    """
    values = [0.0, 1.0]
    max_exp = k - 1
    for i in range(max_exp):
        items = 2**i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + i)
        # float32 products, as bitsandbytes computes them, so k = 8 matches its table bit for bit
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.unique(torch.tensor(values, dtype=torch.float32))


def quantile_codebook(normalized: torch.Tensor, k: int, max_samples: int = 1 << 20) -> torch.Tensor:
    """Quantile type: q_i = (Q(i/(2^k+1)) + Q((i+1)/(2^k+1))) / 2, Q the empirical quantile function of
    this tensor's block-normalized values (so every bin holds about the same number of weights).

    Large tensors are subsampled with a fixed stride (deterministic) before sorting.
    """
    x = normalized.reshape(-1).float()
    if x.numel() > max_samples:
        x = x[:: math.ceil(x.numel() / max_samples)]
    # numpy's sort (SIMD) is ~20x faster than torch.sort here and sorts the same values the same way
    x = torch.from_numpy(np.sort(x.contiguous().numpy()))
    n = 2**k
    probs = torch.arange(n + 1, dtype=torch.float64) / (n + 1)
    # linear interpolation between order statistics, as numpy.quantile does
    pos = probs * (x.numel() - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=x.numel() - 1)
    w = pos - lo
    q = x[lo].double() * (1 - w) + x[hi].double() * w
    table = (q[:-1] + q[1:]) / 2
    # The formula never reaches Q(1): its extremes sit inside (-1, 1), yet every block holds a value of
    # exactly +-1 (its own absmax), the largest error source. Stretch each side so the extremes are -1 and
    # +1 (as NormalFloat's construction does); the order and the zero crossing are kept.
    lo_v, hi_v = table.min(), table.max()
    if lo_v < 0:
        table = torch.where(table < 0, table / -lo_v, table)
    if hi_v > 0:
        table = torch.where(table > 0, table / hi_v, table)
    # + 0.0 turns a -0.0 into 0.0: which zero an order statistic picks up from a run of ±0 weights is up to
    # the sort, and the stored table must not depend on that
    return torch.sort(table.to(torch.float32)).values + 0.0


def fixed_codebook(dtype: str, k: int) -> torch.Tensor:
    check_bits(k)
    builders = {"int": int_codebook, "fp": fp_codebook, "nf": nf_codebook, "dynamic": dynamic_codebook}
    if dtype not in builders:
        raise bad_input(f"unknown data type {dtype!r}; choose one of {', '.join(DTYPES)}")
    return builders[dtype](k)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise bad_input(f"unknown data type {dtype!r}; choose one of {', '.join(DTYPES)}")
