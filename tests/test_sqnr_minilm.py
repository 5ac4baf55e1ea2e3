"""The issue's must-show numbers, as tests on all-MiniLM-L6-v2's 37 linear weights (encoder + pooler, the
default targets): SQNR = 10 log10(sum w^2 / sum (w - decode(encode(w)))^2) over all of them together.

- nf, k = 4, blocks of 64 with the default settings: at least what bitsandbytes NF4 gives on the same
  tensors (measured here, in the same run: 20.549 dB); ours: 21.03 dB (the per-block scale search).
  With plain absmax scales (scale_search 1) and fp32 scales the codes are bitsandbytes' own, bit for bit.
- int8: at least 40 dB (43.87 measured).
- Monotone (non-decreasing) in k = 2..8 for every data type, on a representative subset (6 tensors, one
  of each kind, from different layers) to keep the grid of 35 configurations fast.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from kbitcli.core.blockwise import Spec, dequantize, quantize
from kbitcli.core.codebooks import DTYPES
from kbitcli.plan import auto_search
from kbitcli.recipes import Recipe, is_default_target

SUBSET = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.key.weight",
          "encoder.layer.2.attention.self.value.weight", "encoder.layer.3.attention.output.dense.weight",
          "encoder.layer.4.intermediate.dense.weight", "encoder.layer.5.output.dense.weight"]


@pytest.fixture(scope="module")
def linear(minilm_dir) -> dict[str, torch.Tensor]:
    sd = load_file(os.path.join(minilm_dir, "model.safetensors"))
    out = {n: t for n, t in sd.items() if is_default_target(n, tuple(t.shape), t.is_floating_point())}
    assert len(out) == 37 and "pooler.dense.weight" in out
    assert sum(t.numel() for t in out.values()) == 10_764_288
    return out


def aggregate_sqnr(ws: dict[str, torch.Tensor], roundtrip) -> float:
    signal = noise = 0.0
    for n, w in ws.items():
        w64 = w.double()
        signal += w64.pow(2).sum().item()
        noise += (w64 - roundtrip(n, w).reshape(w.shape).double()).pow(2).sum().item()
    return 10 * math.log10(signal / noise)


def ours(spec: Spec):
    return lambda n, w: dequantize(quantize(w, spec, n))


def default_spec(**changes) -> Spec:
    r = Recipe()  # the CLI's defaults: k = 4, B = 64, nf, fp16 scales, data-free scale choice
    s = dict(bits=r.bits, block_size=r.block_size, dtype=r.dtype, double_quant=r.double_quant,
             scale_dtype=r.scale_dtype, scale_search=auto_search(r.settings(), calibrated=False))
    return Spec(**{**s, **changes})


def test_nf4_at_least_bitsandbytes(linear):
    import bitsandbytes.functional as F

    def bnb(n, w):
        return F.dequantize_4bit(*F.quantize_4bit(w, blocksize=64, quant_type="nf4"))

    reference = aggregate_sqnr(linear, bnb)
    assert round(reference, 2) == 20.55  # REFERENCE.md's figure for the same tensors
    spec = default_spec()
    assert (spec.bits, spec.block_size, spec.dtype) == (4, 64, "nf")
    # the data-free default is plain absmax (issue 8: the unweighted search lost nats on SmolLM2), so it is
    # bitsandbytes' NF4 up to the rounding of its scales to fp16
    measured = aggregate_sqnr(linear, ours(spec))
    assert abs(measured - reference) < 0.01, (measured, reference)
    # the unweighted search still lowers tensor error (what it was built for), which is not model loss
    searched = aggregate_sqnr(linear, ours(default_spec(scale_search=4)))
    assert searched >= reference + 0.4, (searched, reference)
    # plain absmax with fp32 scales is bitsandbytes' NF4 exactly
    plain = aggregate_sqnr(linear, ours(default_spec(scale_search=1, scale_dtype="fp32")))
    assert plain == reference


def test_int8_at_least_40db(linear):
    assert aggregate_sqnr(linear, ours(default_spec(bits=8, dtype="int"))) >= 40.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_monotone_in_k(linear, dtype):
    subset = {n: linear[n] for n in SUBSET}
    values = [aggregate_sqnr(subset, ours(default_spec(bits=k, dtype=dtype))) for k in range(2, 9)]
    for k, (lo, hi) in enumerate(zip(values, values[1:]), start=2):
        assert hi >= lo, f"{dtype}: SQNR {lo:.3f} dB at k={k} > {hi:.3f} dB at k={k + 1} ({values})"
    assert values[-1] - values[0] > 25  # from 2 to 8 bits: decades of improvement, not a flat line
