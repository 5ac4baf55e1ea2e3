"""Codebooks: every data type for every k, checked against independent constructions and bitsandbytes."""

from __future__ import annotations

import os
from statistics import NormalDist

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kbitcli.core import codebooks as cb
from kbitcli.errors import KbitError

KS = range(2, 9)
# REFERENCE.md: bitsandbytes' NF4 table, code 0..15
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
# the paper's exponent bits per k (k = 2 has room for sign + one exponent bit only)
PAPER_EXPONENT_BITS = {2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", cb.FIXED_DTYPES)
def test_every_fixed_table_is_a_sorted_table_in_unit_range(dtype, k):
    t = cb.fixed_codebook(dtype, k)
    assert t.dtype == torch.float32 and t.ndim == 1
    assert torch.all(t[1:] > t[:-1]), "sorted ascending, no duplicates"
    assert t.max().item() == 1.0 and t.min().item() >= -1.0
    assert (t == 0).sum() == 1, "an exact zero"
    symmetric = dtype in ("int", "fp")
    assert t.numel() == 2**k - (1 if symmetric else 0)
    if symmetric:
        assert torch.equal(t, -t.flip(0))


@pytest.mark.parametrize("k", KS)
def test_int_is_the_symmetric_integer_grid(k):
    m = 2 ** (k - 1) - 1
    expect = torch.tensor([i / m for i in range(-m, m + 1)], dtype=torch.float64).float()
    assert torch.equal(cb.int_codebook(k), expect)


def test_int8_is_minus127_to_127():
    t = cb.int_codebook(8).double() * 127
    assert t.numel() == 255 and torch.allclose(t, torch.arange(-127, 128, dtype=torch.float64), atol=1e-5)


def _float_values(k: int, e_bits: int) -> list[float]:
    """All values of a sign/exponent/mantissa float with bias 2^(E-1), subnormals, no NaN/Inf: from bit patterns."""
    m_bits = k - 1 - e_bits
    bias = 2 ** (e_bits - 1)
    out = set()
    for pattern in range(2**k):
        sign = -1.0 if pattern >> (k - 1) else 1.0
        e = (pattern >> m_bits) & (2**e_bits - 1)
        m = pattern & (2**m_bits - 1)
        mag = (m / 2**m_bits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**m_bits) * 2.0 ** (e - bias)
        out.add(sign * mag + 0.0)
    top = max(out)
    return sorted(v / top for v in out)


@pytest.mark.parametrize("k", KS)
def test_fp_uses_the_papers_exponent_split(k):
    assert cb.FP_EXPONENT_BITS == PAPER_EXPONENT_BITS
    expect = torch.tensor(_float_values(k, PAPER_EXPONENT_BITS[k]), dtype=torch.float64).float()
    assert torch.equal(cb.fp_codebook(k), expect)


def test_fp4_is_e2m1():
    # E2M1, bias 2: magnitudes 0, .25 (subnormal), .5, .75, 1, 1.5, 2, 3 -> / 3
    mags = [0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3]
    expect = sorted({s * v / 3 for v in mags for s in (1, -1)})
    assert torch.allclose(cb.fp_codebook(4).double(), torch.tensor(expect, dtype=torch.float64), atol=1e-7)


def test_nf4_equals_the_reference_table_exactly():
    assert cb.nf_codebook(4).tolist() == torch.tensor(NF4, dtype=torch.float32).tolist()


def test_nf4_equals_bitsandbytes():
    import bitsandbytes.functional as F

    bnb = F.get_4bit_type("nf4", device="cpu")
    assert torch.equal(cb.nf_codebook(4), torch.sort(bnb).values)
    normal = F.create_normal_map()  # 256 entries, the 16 NF4 values and zero padding
    assert torch.equal(cb.nf_codebook(4), torch.unique(normal))


@pytest.mark.parametrize("k", KS)
def test_nf_is_normal_quantiles_with_exact_zero(k):
    t = cb.nf_codebook(k).double()
    n = 2**k
    assert (t > 0).sum() == n // 2 and (t < 0).sum() == n // 2 - 1 and (t == 0).sum() == 1
    # independent float64 construction (QLoRA): equal-probability quantiles of N(0,1), extremes at +-1
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    expect = np.sort(np.array(pos + neg + [0.0])) / max(pos)
    assert np.allclose(t.numpy(), expect, atol=2e-6)


@pytest.mark.parametrize("k", KS)
def test_dynamic_equals_bitsandbytes_dynamic_map(k):
    import bitsandbytes.functional as F

    bnb = F.create_dynamic_map(signed=True, max_exponent_bits=k - 1, total_bits=k)  # padded with zeros to 256
    assert torch.equal(cb.dynamic_codebook(k), torch.unique(bnb))


def test_dynamic8_is_bnbs_signed_8bit_map():
    import bitsandbytes.functional as F

    t = cb.dynamic_codebook(8)
    assert torch.equal(t, F.create_dynamic_map(signed=True))
    assert t.numel() == 256 and t.max() == 1.0
    assert abs(t.min().item() + 0.99297) < 1e-5 and abs(t[t > 0].min().item() - 5.5e-7) < 1e-9


@pytest.fixture(scope="module")
def real_normalized(stories_dir):
    """stories260K's layer-0 up_proj, divided by the absmax of its 64-value blocks (what quantile sees)."""
    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight").reshape(-1, 64)
    return (w / w.abs().amax(dim=1, keepdim=True)).reshape(-1)


@pytest.mark.parametrize("k", KS)
def test_quantile_matches_numpy_quantiles(real_normalized, k):
    t = cb.quantile_codebook(real_normalized, k)
    n = 2**k
    x = real_normalized.double().numpy()
    q = np.quantile(x, np.arange(n + 1) / (n + 1))  # linear interpolation
    table = (q[:-1] + q[1:]) / 2
    table = np.where(table < 0, table / -table.min(), table / table.max())
    assert t.numel() == n and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert np.allclose(t.double().numpy(), np.sort(table), atol=1e-6)


def test_quantile_subsamples_large_tensors_deterministically():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_000, generator=g).clamp(-4, 4) / 4
    a, b = cb.quantile_codebook(x, 5), cb.quantile_codebook(x.clone(), 5)
    assert torch.equal(a, b) and a.numel() == 32


@pytest.mark.parametrize("bad", [1, 9, 0, -4, 4.0, "4", True])
def test_bits_outside_2_to_8_are_refused(bad):
    with pytest.raises(KbitError) as e:
        cb.fixed_codebook("nf", bad)
    assert e.value.exit_code == 2 and "2 to 8" in str(e.value)


def test_unknown_data_type_is_refused():
    with pytest.raises(KbitError, match="unknown data type 'nf4'"):
        cb.fixed_codebook("nf4", 4)
    with pytest.raises(KbitError):
        cb.check_dtype("float")
