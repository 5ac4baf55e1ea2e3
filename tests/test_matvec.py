"""The fused k-bit kernel (core/matvec.py) against KbitLinear's dequantize-by-slabs path, on stories260K's real
weights (ragged 172-column rows with blocks of 64) and every k, data type, scale storage and layout."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from kbitcli.core import matvec
from kbitcli.core.blockwise import Spec, dequantize, quantize
from kbitcli.models.kbit_linear import KbitLinear

W_DOWN = "model.layers.0.mlp.down_proj.weight"  # [64, 172]: rows run across block boundaries at B = 64
W_UP = "model.layers.0.mlp.up_proj.weight"  # [172, 64]


@pytest.fixture(scope="module")
def weights(stories_dir):
    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in (W_DOWN, W_UP)}


@pytest.fixture(scope="module")
def lib():
    lib = matvec.kernel()
    assert lib is not None, "gcc is present on the test machines: the kernel must build"
    return lib


def slab_result(m: KbitLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference: the core's torch decoder (core/blockwise.dequantize, no compiled code), then matmul, in
    float64."""
    w = dequantize(m.quantized_tensor()).double()
    w = w.t() if m.transposed else w  # the core gives the stored [in, out] of a Conv1D
    return x.double() @ w.t()


@contextlib.contextmanager
def exact(lib):
    """The exact fp32 walk for batch-1 k = 4 / k = 8 int rows too (KBIT_EXACT=1), for `lib` only, in the block."""
    lib.kbit_set_int16(0)
    try:
        yield
    finally:
        lib.kbit_set_int16(0 if matvec.EXACT else 1)


def check(m: KbitLinear, lib, rows: int, seed: int = 0, threads: int | None = None):
    """The kernel's exact path against the float64 reference: every k, dtype and layout within fp32 rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, m.in_features, generator=g)
    with exact(lib):
        got = m.packed_weight().matmul(lib, x, threads=threads)
    ref = slab_result(m, x)
    assert got.shape == (rows, m.out_features)
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-6, f"relative error {err:.2e}"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", ["nf", "fp", "int", "quantile", "dynamic"])
def test_every_k_and_dtype(weights, lib, bits, dtype):
    dq = (bits + len(dtype)) % 2 == 0  # half the cases double-quantized, spread over k and dtype
    m = KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(bits, 64, dtype, double_quant=dq)))
    for rows in (1, 3, 11):  # 11: one full group of 8 rows of x and a ragged rest
        check(m, lib, rows, seed=bits)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16", "fp32", "dq"])
def test_scale_storage_and_transposed(weights, lib, bits, scale_dtype):
    spec = Spec(bits, 64, "nf", double_quant=scale_dtype == "dq", scale_dtype="fp16" if scale_dtype == "dq" else scale_dtype)
    for name in (W_DOWN, W_UP):
        w = weights[name]
        plain = KbitLinear.from_quantized(quantize(w, spec))
        conv = KbitLinear.from_quantized(quantize(w, spec), transposed=True)  # Conv1D: stored [in, out]
        for rows in (1, 9):
            check(plain, lib, rows)
            check(conv, lib, rows)


@pytest.mark.parametrize("block", [16, 48, 172, 1000])
def test_blocks_that_do_not_fit_rows_or_vectors(weights, lib, block):
    """Blocks smaller than, larger than and unaligned to a 172-value row, and to the kernel's 16-value vectors."""
    for bits in (3, 4, 7):
        m = KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(bits, block, "int", double_quant=bits == 7)))
        check(m, lib, 2)
        check(KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(bits, block, "fp")), transposed=True), lib, 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_rows_of_whole_blocks(lib, bits):
    """The straight walk for rows that are whole power-of-two blocks (the usual layer): blocks of 16 to 256, a row
    longer than one pass of the kernel's scale table (516 blocks of 16), 1, 2 and 9 rows of x (4, 2 and 1
    accumulators per row), computed and looked-up codebooks."""
    g = torch.Generator().manual_seed(bits)
    dtype = "int" if bits in (6, 8) else "nf"
    for shape, block in (((96, 128), 16), ((40, 256), 64), ((24, 512), 256), ((3, 16 * 516), 16)):
        w = torch.randn(shape, generator=g)
        m = KbitLinear.from_quantized(quantize(w, Spec(bits, block, dtype, double_quant=bits % 2 == 1)))
        for rows in (1, 2, 9):
            check(m, lib, rows, seed=rows)


def test_threads_agree_on_a_large_layer(lib):
    """A layer big enough to be cut into chunks for several threads gives what one thread gives, bit for bit."""
    w = torch.randn(700, 300, generator=torch.Generator().manual_seed(1))
    for transposed in (False, True):
        m = KbitLinear.from_quantized(quantize(w, Spec(5, 64, "nf", double_quant=True)), transposed=transposed)
        x = torch.randn(3, m.in_features)
        one = m.packed_weight().matmul(lib, x, threads=1)
        pw = m.packed_weight()
        pw.threads_cap = 4
        assert torch.equal(pw.matmul(lib, x, threads=4), one)
        check(m, lib, 3, threads=4)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_k4_straight_line_walk(lib, block):
    """k = 4 with blocks of 32, 64 or 128 (every recipe's) takes a walk compiled per block size (blocks in pairs,
    two accumulators): rows of an odd and an even number of blocks, a row longer than one pass of the scale table
    (512 blocks), every scale storage, one row of x (the walk) and three (the general one)."""
    g = torch.Generator().manual_seed(block)
    for cols, scale_dtype, dq in ((block * 5, "fp16", False), (block * 6, "fp32", False), (block * 7, "bf16", False),
                                  (block * 515, "fp16", True)):
        w = torch.randn(24 if cols < 10_000 else 3, cols, generator=g)
        m = KbitLinear.from_quantized(quantize(w, Spec(4, block, "nf", double_quant=dq, scale_dtype=scale_dtype)))
        for rows in (1, 3):
            check(m, lib, rows, seed=rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_uses_kernel_and_matches_slab_path(weights, lib, dtype, monkeypatch):
    """KbitLinear.forward: batch 1 and a small batch go through the kernel, a batch past the crossover through
    the slabs; both agree with the slab path (KBIT_KERNEL=0), bias included, in fp32 and bf16."""
    bias = torch.randn(64)
    m = KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(4, 64, "nf", double_quant=True)), bias=bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    calls = []
    matmul = matvec.PackedWeight.matmul
    monkeypatch.setattr(matvec.PackedWeight, "matmul", lambda self, *a, **k: calls.append(1) or matmul(self, *a, **k))
    for shape in ((1, 1, 172), (2, 3, 172), (1, m.kernel_max_rows() + 5, 172)):
        x = torch.randn(shape).to(dtype)
        assert (m._use_kernel(x) is not None) == (x.numel() <= m.kernel_max_rows() * 172)
        with torch.no_grad():
            calls.clear()
            fused = m(x)
            # forward's inlined fp32 check and _use_kernel (the other dtypes' path) agree on when the kernel runs
            assert len(calls) == (m._use_kernel(x) is not None)
            monkeypatch.setattr(matvec, "ENABLED", False)  # what KBIT_KERNEL=0 sets at import
            assert m._use_kernel(x) is None
            slab = m(x)
            monkeypatch.setattr(matvec, "ENABLED", True)
        assert fused.dtype == dtype and fused.shape == slab.shape == (*shape[:-1], 64)
        assert (fused.float() - slab.float()).abs().max() <= tol * slab.float().abs().max()


def test_autograd_keeps_the_slab_path(weights):
    m = KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(4, 64, "nf")))
    x = torch.randn(1, 172, requires_grad=True)
    assert m._use_kernel(x) is None  # finetuning needs the graph: torch's path
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_python_entry_point_and_ctypes_only_build_agree(weights, lib, tmp_path):
    """Where Python.h is present the library is also a CPython extension and batch-1 calls go through its
    `matmul` (csrc/kbit_pyext.c); without it (python=False: what a machine without python3-dev builds) ctypes
    makes the same call. Same result bit for bit; a malformed call is a Python error, not a crash."""
    if matvec.python_include() is not None:
        assert lib.fast_matmul is not None, "Python.h is present: the kernel must be built as an extension"
        with pytest.raises(TypeError):
            lib.fast_matmul(1, 2, 3)
        with pytest.raises(ValueError):
            lib.fast_matmul(0, 0, 1, 0, 1)
    plain = matvec.load(matvec.build(directory=str(tmp_path), python=False))
    assert plain.fast_matmul is None
    for bits in (3, 4, 8):
        m = KbitLinear.from_quantized(quantize(weights[W_UP], Spec(bits, 64, "nf")))
        x = torch.randn(2, 64)
        assert torch.equal(m.packed_weight().matmul(lib, x), m.packed_weight().matmul(plain, x))
        check(m, plain, 2)


def test_portable_build_matches(weights, tmp_path):
    """The non-AVX-512 loop (what a CPU without VBMI gets) computes the same result."""
    path = matvec.build(extra_flags=("-DKBIT_PORTABLE",), directory=str(tmp_path))
    portable = matvec.load(path)
    assert portable.kbit_has_simd() == 0
    for bits in (3, 4, 8):
        m = KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(bits, 64, "dynamic", double_quant=True)))
        check(m, portable, 5)
        assert torch.equal(m.packed_weight().decode_rows(portable, 0, 64), dequantize(m.quantized_tensor()))
        check(KbitLinear.from_quantized(quantize(weights[W_UP], Spec(bits, 64, "int")), transposed=True), portable, 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_compiled_decoder_is_bit_exact(weights, lib, bits):
    """KbitLinear's slab path decodes with the compiled kbit_decode: bit for bit the core's torch decoder (every
    data type; fp16 / bf16 / fp32 / double-quantized scales; blocks spanning rows; row ranges that start
    mid-block; several threads)."""
    for dtype, block, scale_dtype, dq in (("nf", 64, "fp16", False), ("fp", 48, "bf16", False),
                                          ("int", 1000, "fp32", False), ("quantile", 64, "fp16", True),
                                          ("dynamic", 16, "fp16", True)):
        for name in (W_DOWN, W_UP):
            qt = quantize(weights[name], Spec(bits, block, dtype, double_quant=dq, scale_dtype=scale_dtype))
            m = KbitLinear.from_quantized(qt)
            assert torch.equal(m.dequantize_weight(), dequantize(qt))
            for r0, r1 in ((0, 1), (1, 3), (5, m.shape[0])):
                assert torch.equal(m.dequantize_rows(r0, r1), m.dequantize_rows_torch(r0, r1))
    big = KbitLinear.from_quantized(quantize(torch.randn(700, 300), Spec(bits, 64, "nf", double_quant=True)))
    pw = big.packed_weight()
    assert torch.equal(pw.decode_rows(lib, 0, 700, threads=4), pw.decode_rows(lib, 0, 700, threads=1))
    assert torch.equal(pw.decode_rows(lib, 0, 700, threads=4), big.dequantize_rows_torch(0, 700))


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as fh:
        return set(next((line for line in fh if line.startswith("flags")), "").split())


def test_the_cpus_simd_path_is_the_one_built(lib):
    """-march=native picks the AVX-512 VBMI path where the CPU has it, else AVX2 + FMA, else the portable loop (a
    regression here is a silent 5-10x slowdown: the portable loop is slower than fp32 dense)."""
    flags = _cpu_flags()
    want = 1 if {"avx512f", "avx512bw", "avx512vbmi"} <= flags else (2 if {"avx2", "fma"} <= flags else 0)
    assert lib.kbit_has_simd() == want


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_avx2_path_matches(weights, tmp_path, bits):
    """The AVX2 + FMA path (what AMD Zen 1-3 and most Intel client CPUs get), built on purpose where the CPU runs
    it: every k, ragged rows (172 columns in blocks of 64), Conv1D layout, and the one-row fast walk of k = 4
    (byte-shuffle lookups, x reordered) and k = 8 (int: computed values; nf: gathered) over whole blocks."""
    if not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA")
    avx2 = matvec.load(matvec.build(extra_flags=("-DKBIT_NO_AVX512",), directory=str(tmp_path)))
    assert avx2.kbit_has_simd() == 2
    for dtype in ("nf", "int"):
        dq = bits % 2 == 1
        m = KbitLinear.from_quantized(quantize(weights[W_DOWN], Spec(bits, 64, dtype, double_quant=dq)))
        for rows in (1, 2, 9):
            check(m, avx2, rows, seed=bits)
        assert torch.equal(m.packed_weight().decode_rows(avx2, 1, 64), dequantize(m.quantized_tensor())[1:])
        check(KbitLinear.from_quantized(quantize(weights[W_UP], Spec(bits, 48, dtype)), transposed=True), avx2, 3)
        w = torch.randn(40, 256, generator=torch.Generator().manual_seed(bits))
        for block in (32, 64, 256, 16):  # 16: k = 4 leaves the fast walk (it takes blocks of 32s)
            m = KbitLinear.from_quantized(quantize(w, Spec(bits, block, dtype, double_quant=dq, scale_dtype="bf16")))
            check(m, avx2, 1, seed=block)


def test_build_is_cached_and_failure_falls_back(tmp_path):
    path = matvec.build(directory=str(tmp_path))
    assert os.path.basename(path).startswith("kbit_matmul-") and os.listdir(tmp_path) == [os.path.basename(path)]
    mtime = os.path.getmtime(path)
    assert matvec.build(directory=str(tmp_path)) == path and os.path.getmtime(path) == mtime  # not rebuilt
    with pytest.raises(RuntimeError, match="failed"):
        matvec.build(cc="/bin/false", directory=str(tmp_path / "x"))
    assert not [f for f in os.listdir(tmp_path / "x") if f.endswith(".so")]  # nothing half-written left behind


def test_a_python_h_that_does_not_compile_falls_back_to_ctypes(tmp_path, monkeypatch):
    """Headers of another interpreter (here: a Python.h that does not compile): the kernel is built without the
    CPython entry point, not given up for torch's slab path."""
    broken = tmp_path / "include"
    broken.mkdir()
    (broken / "Python.h").write_text("#error not this interpreter's headers\n")
    monkeypatch.setattr(matvec, "python_include", lambda: str(broken))
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path / "cache"))
    matvec._kernel.cache_clear()
    try:
        lib = matvec._kernel()
        assert lib is not None and lib.fast_matmul is None and lib.kbit_abi_version() == matvec.ABI_VERSION
    finally:
        matvec._kernel.cache_clear()  # the next caller builds (or finds) the real one again


def test_no_compiler_warns_once_and_generates(stories_dir, tmp_path):
    """A fresh process with no usable compiler: one warning on stderr, and a k-bit model still runs."""
    code = ("import torch\nfrom kbitcli.core.blockwise import Spec, quantize\n"
            "from kbitcli.models.kbit_linear import KbitLinear\n"
            "m = KbitLinear.from_quantized(quantize(torch.randn(64, 172), Spec(4, 64, 'nf')))\n"
            "x = torch.randn(1, 172)\n"
            "a, b = m(x), m(x)\n"
            "assert torch.allclose(a, x @ m.dequantize_weight().t(), atol=1e-4)\nprint('ok')\n")
    env = dict(os.environ, CC="/nonexistent/cc", KBIT_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok" and r.stderr.count("fused k-bit kernel unavailable") == 1
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(env, KBIT_KERNEL="0"))
    assert r.returncode == 0 and "unavailable" not in r.stderr  # switched off on purpose: silent
