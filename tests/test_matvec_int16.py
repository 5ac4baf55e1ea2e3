"""The integer path of batch-1 decode (csrc/kbit_int16.h): k = 4 (any codebook) and k = 8 int rows of whole
blocks of 32, 64 or 128 with one row of x. It must compute exactly "x rounded to int16 per 32 values (14 bits),
the codebook to int16" (checked against that rounding done in torch, in float64), stay within fp32-like
distance of the exact path, be switched off by KBIT_EXACT=1 / matvec.set_exact, and leave every other shape on
the exact path."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from kbitcli.core import matvec
from kbitcli.core.blockwise import Spec, dequantize, quantize
from kbitcli.models.kbit_linear import KbitLinear

W_UP = "model.layers.0.mlp.up_proj.weight"  # [172, 64]: a real weight, 64 values a row


@pytest.fixture(scope="module")
def lib():
    lib = matvec.kernel()
    assert lib is not None, "gcc is present on the test machines: the kernel must build"
    if not lib.kbit_has_int16():
        pytest.skip("this CPU has no AVX2: no integer path")
    return lib


@pytest.fixture(scope="module")
def up(stories_dir):
    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as h:
        return h.get_tensor(W_UP)


def run(m: KbitLinear, lib, x: torch.Tensor, integer: bool, threads: int = 1) -> torch.Tensor:
    lib.kbit_set_int16(1 if integer else 0)
    try:
        return m.packed_weight().matmul(lib, x, threads=threads)
    finally:
        lib.kbit_set_int16(0 if matvec.EXACT else 1)


def int16_reference(m: KbitLinear, x: torch.Tensor) -> torch.Tensor:
    """What the integer path computes, in float64: x rounded per 32 consecutive values to int16 of at most 16383
    (scale = absmax / 16383, rounded as the C code rounds: fp32 16383 / absmax, fp32 product, nearest even), the
    codebook to int16 the same way, in fp32 too (an int codebook is integers already: unchanged)."""
    qt = m.quantized_tensor()
    z, _ = matvec.affine_form(qt.codebook)
    cb = qt.codebook.double()
    if z < 0:  # in fp32, as the C code computes it: -0.1666667 * 16383 is -2730.5 in fp32, rounded to even
        amax = qt.codebook[:16].abs().max()
        cb = torch.round(qt.codebook / amax * 16383).double() * (amax.double() / 16383)
    w = dequantize(dataclasses.replace(qt, codebook=cb.float())).double().reshape(m.out_features, m.in_features)
    g = x.reshape(-1, 32)
    amax = g.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(16383.0) / amax, torch.zeros_like(amax))
    xq = torch.round(g * inv).double() * (amax.double() / 16383)
    return xq.reshape(x.shape) @ w.t()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


CASES = [(4, "nf", 64, "fp16", True), (4, "nf", 32, "fp16", False), (4, "nf", 128, "bf16", False),
         (4, "fp", 64, "fp32", False), (4, "int", 64, "fp16", False), (4, "quantile", 64, "fp16", True),
         (4, "dynamic", 32, "fp16", False), (8, "int", 64, "fp16", False), (8, "int", 32, "bf16", True),
         (8, "int", 128, "fp32", False)]


@pytest.mark.parametrize("bits,dtype,block,scale_dtype,dq", CASES)
def test_integer_path_is_the_int16_rounding(up, lib, bits, dtype, block, scale_dtype, dq):
    """On a real weight (block 32 / 64) and a random one of 5 blocks a row (odd: the walk's pairs and its last
    block), every scale storage: the path is taken (the result is not the exact one), is the int16 rounding to
    fp32 accuracy, and within 5e-4 of the exact result (the rounding of x: ~1e-4 of the largest output)."""
    g = torch.Generator().manual_seed(bits * block)
    weights = [torch.randn(24, block * 5, generator=g)] + ([up] if block <= 64 else [])
    for w in weights:
        spec = Spec(bits, block, dtype, double_quant=dq, scale_dtype=scale_dtype if not dq else "fp16")
        m = KbitLinear.from_quantized(quantize(w, spec))
        x = torch.randn(1, m.in_features, generator=g)
        got, ex = run(m, lib, x, integer=True), run(m, lib, x, integer=False)
        assert not torch.equal(got, ex), "the integer path was not taken"
        assert relative(got, int16_reference(m, x)) < 2e-6
        assert relative(got, ex) < 5e-4


def test_large_layer_threads_agree(lib):
    """Rows cut into chunks for several threads: bit for bit what one thread computes; a row longer than one
    pass of the scale table (512 blocks)."""
    g = torch.Generator().manual_seed(3)
    for shape in ((700, 256), (3, 32 * 515)):
        m = KbitLinear.from_quantized(quantize(torch.randn(shape, generator=g), Spec(4, 32, "nf", double_quant=True)))
        m.packed_weight().threads_cap = 4
        x = torch.randn(1, m.in_features, generator=g)
        one = run(m, lib, x, integer=True, threads=1)
        assert torch.equal(run(m, lib, x, integer=True, threads=4), one)
        assert relative(one, int16_reference(m, x)) < 1e-5


def test_other_shapes_stay_exact(up, lib):
    """Two rows of x, k = 3 / 5 / 8 nf, blocks of 16 or 48, ragged rows, a Conv1D layout: the exact path, with
    the integer path switched on."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 192, generator=g)
    cases = [(Spec(4, 64, "nf"), False, 2), (Spec(3, 64, "nf"), False, 1), (Spec(5, 64, "int"), False, 1),
             (Spec(8, 64, "nf"), False, 1), (Spec(4, 16, "nf"), False, 1), (Spec(4, 48, "nf"), False, 1),
             (Spec(4, 64, "nf"), True, 1)]
    for spec, transposed, rows in cases:
        m = KbitLinear.from_quantized(quantize(w, spec), transposed=transposed)
        x = torch.randn(rows, m.in_features, generator=g)
        assert torch.equal(run(m, lib, x, integer=True), run(m, lib, x, integer=False)), spec
    ragged = KbitLinear.from_quantized(quantize(up.t().contiguous(), Spec(4, 64, "nf")))  # [64, 172]
    x = torch.randn(1, 172, generator=g)
    assert torch.equal(run(ragged, lib, x, integer=True), run(ragged, lib, x, integer=False))


def test_non_finite_and_zero_x(lib):
    """NaN / Inf in x: the exact path computes the row (NaN / Inf out, as dense gives), never integer garbage; an
    all-zero x gives zeros."""
    m = KbitLinear.from_quantized(quantize(torch.randn(8, 128), Spec(4, 64, "nf")))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 128)
        x[0, 70] = bad
        got = run(m, lib, x, integer=True)
        assert torch.equal(got.isnan(), run(m, lib, x, integer=False).isnan()) and not got.isfinite().any()
    assert torch.equal(run(m, lib, torch.zeros(1, 128), integer=True), torch.zeros(1, 8))


def test_set_exact_and_kbit_exact_env(lib):
    """set_exact switches the process's kernel and returns the previous setting; KBIT_EXACT=1 in a fresh process
    starts exact, as does set_exact(True) called before the kernel is built: a batch-1 nf4 forward is then the
    exact path's result."""
    m = KbitLinear.from_quantized(quantize(torch.randn(8, 128), Spec(4, 64, "nf")))
    x = torch.randn(1, 128)
    old = matvec.set_exact(True)
    try:
        assert matvec.EXACT and torch.equal(m(x), run(m, lib, x, integer=False))
        assert matvec.set_exact(False) is True and not matvec.EXACT
        assert torch.equal(m(x), run(m, lib, x, integer=True))
    finally:
        matvec.set_exact(old)
    code = ("import torch\nfrom kbitcli.core import matvec\nfrom kbitcli.core.blockwise import Spec, quantize\n"
            "from kbitcli.models.kbit_linear import KbitLinear\n"
            "m = KbitLinear.from_quantized(quantize(torch.randn(8, 128), Spec(4, 64, 'nf')))\n"
            "x = torch.randn(1, 128)\nlib = matvec.kernel()\n"
            "ref = x.double() @ m.dequantize_weight().double().t()\n"
            "print(matvec.EXACT, float((m(x).double() - ref).abs().max() / ref.abs().max()) < 2e-6)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, KBIT_EXACT="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
    # set_exact(True) before the library is built or loaded: it is loaded exact
    first = code.replace("from kbitcli.core import matvec\n", "from kbitcli.core import matvec\nmatvec.set_exact(True)\n")
    assert first != code
    r = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "KBIT_EXACT"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
