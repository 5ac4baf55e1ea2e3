"""Fused k-bit small-batch matmul on CPU: y = x @ W^T straight from the packed codes (csrc/kbit_matmul.c).

Why: at batch 1 (token-by-token generation) a linear layer reads every weight once, so its time is memory
traffic. Decoding W to fp32 first (KbitLinear's slab path) reads the codes, writes an fp32 copy and reads it
back: ~9x the bytes of a 4-bit weight, hence slower than dense. The kernel decodes 16 codes at a time into a
SIMD register (a byte shuffle + per-lane shifts pull any k = 2..8 out of the MSB-first stream; the codebook
sits in registers: one `vpermps` for k <= 4, a tree of two-register lookups for k = 5..8), multiplies by the
block scale and accumulates against x; nothing bigger than a register is written. Output rows (for a
transposed weight, output columns) are cut into chunks that the calling thread and a small pthread pool take
from an atomic ticket; the caller never waits for a worker the OS has not scheduled (OpenMP's fork/join does,
and on this shared 2-core machine that cost ~8 ms per layer: see the comment in the C file). At one row of x,
k = 4 layers (and k = 8 int ones) of whole blocks of 32 / 64 / 128 take an integer path on AVX2 (not AVX-512) CPUs
(csrc/kbit_int16.h: x and the codebook rounded to int16, exact integer sums; ~1.4x the exact walk's speed, the
same model loss to 4 decimals); KBIT_EXACT=1 / set_exact(True) keeps them on the exact fp32 walk.

Why C compiled at first use (not numba, not torch's int4/int8 packed kernels): torch's kernels cover only
uniform integer grids (no nf, fp, quantile, dynamic; no odd k); numba is a new ~40 MB dependency whose
vectorisation of a 16-entry register lookup is not ours to steer. The system C compiler is present wherever
torch's own `torch.compile` works; `-march=native` uses what this CPU has (the AVX-512 VBMI path; else the
AVX2 + FMA path, csrc/kbit_avx2.h, 8 codes at a time; else a portable loop of one code at a time). The build takes about a second, once per machine: the library is cached per user, keyed by
the hash of the source, the flags and the CPU's feature flags, and written via an atomic rename so
concurrent processes never load a half-written file. No compiler, a failed build or KBIT_KERNEL=0 means
None from `kernel()` (a one-line warning on stderr, once, unless switched off on purpose), and callers keep
their torch path: `make test` and `make demo` stay two commands on a machine without gcc.

How Python calls it: ctypes for everything but the batch-1 matmul, which goes through a CPython entry point
compiled into the same library (csrc/kbit_pyext.c) where this interpreter's Python.h is present. A decode step
makes ~200 such calls, and through ctypes each cost ~13 us of call overhead in a real step against ~2 us of work
in a small layer (docs/SPEED.md). Without Python.h the library is built from kbit_matmul.c alone and ctypes
makes that call too (`fast_matmul` is None): same results, bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import torch

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "kbit_matmul.c")
PYEXT_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "kbit_pyext.c")  # SOURCE + a CPython entry point
FLAGS = ["-O3", "-march=native", "-pthread", "-ffp-contract=off", "-shared", "-fPIC"]
ABI_VERSION = 4
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}
MIN_VALUES_PER_THREAD = 1 << 15  # below this a layer runs on one thread: waking a second costs more than it saves


class Weight(ctypes.Structure):
    """Mirrors kbit_weight in kbit_matmul.c."""

    _fields_ = [("codes", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("block", ctypes.c_int64), ("bits", ctypes.c_int32), ("scale_kind", ctypes.c_int32),
                ("scales", ctypes.c_void_p), ("codebook", ctypes.c_void_p), ("dq_table", ctypes.c_void_p),
                ("dq_absmax", ctypes.c_void_p), ("dq_offset", ctypes.c_float), ("transposed", ctypes.c_int32),
                ("affine_zero", ctypes.c_int32), ("affine_step", ctypes.c_float)]


def affine_form(codebook: torch.Tensor) -> tuple[int, float]:
    """(z, d) when every entry i of the codebook is (i - z) * d to within float32 rounding (the int data
    type), else (-1, 0): the kernel then computes values instead of looking them up (k >= 6, where a table
    lookup costs several instructions per 16 values)."""
    t = codebook.detach().double().reshape(-1)
    if t.numel() < 3 or (t <= 0).all() or (t >= 0).all():
        return -1, 0.0
    zeros = (t == 0).nonzero()
    if zeros.numel() != 1:
        return -1, 0.0
    z = int(zeros[0])
    d = float(t[-1] / (t.numel() - 1 - z)) if t.numel() - 1 != z else 0.0
    ideal = (torch.arange(t.numel(), dtype=torch.float64) - z) * d
    if d <= 0 or (ideal - t).abs().max() > 1e-6 * t.abs().max():
        return -1, 0.0
    return z, d


def cache_dir() -> str:
    base = os.environ.get("KBIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kbit")
    return os.path.join(base, "kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def python_include() -> str | None:
    """The folder holding this interpreter's Python.h, or None (no python3-dev: the ctypes-only build)."""
    inc = sysconfig.get_paths().get("include")
    return inc if inc and os.path.isfile(os.path.join(inc, "Python.h")) else None


def build(cc: str | None = None, extra_flags: tuple[str, ...] = (), directory: str | None = None,
          python: bool = True) -> str:
    """Compile the kernel (or find it already compiled) and return the library's path; raises on failure. With
    python (and Python.h present) the library is also a CPython extension module (csrc/kbit_pyext.c)."""
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src, csrc = b"", os.path.dirname(SOURCE)
    for name in sorted(f for f in os.listdir(csrc) if f.endswith((".c", ".h"))):  # the .c files and headers
        with open(os.path.join(csrc, name), "rb") as fh:
            src += name.encode() + fh.read()
    inc = python_include() if python else None
    flags = FLAGS + list(extra_flags) + ([f"-I{inc}"] if inc else [])
    source = PYEXT_SOURCE if inc else SOURCE
    # the extension is tied to this interpreter's ABI: its version and extension suffix are part of the key
    abi = f"{source} {sys.version} {sysconfig.get_config_var('EXT_SUFFIX')}" if inc else source
    key = hashlib.sha256(src + " ".join([cc, abi] + flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    path = os.path.join(directory, f"kbit_matmul-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, source], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']}")
        os.replace(tmp, path)  # atomic: another process sees no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    if lib.kbit_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version {lib.kbit_abi_version()}, expected {ABI_VERSION}")
    lib.kbit_matmul.argtypes = [ctypes.POINTER(Weight), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.kbit_matmul.restype = ctypes.c_int
    lib.kbit_decode.argtypes = [ctypes.POINTER(Weight), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.kbit_decode.restype = ctypes.c_int
    lib.kbit_set_int16.argtypes = [ctypes.c_int]
    lib.kbit_set_int16.restype = None
    lib.kbit_has_int16.restype = ctypes.c_int
    lib.kbit_set_int16(0 if EXACT else 1)
    lib.fast_matmul = _python_entry(lib, path)
    return lib


def _python_entry(lib: ctypes.CDLL, path: str):
    """The library's CPython `matmul` (csrc/kbit_pyext.c), or None for a ctypes-only build."""
    if not hasattr(lib, "PyInit_kbit_kernel"):
        return None
    loader = importlib.machinery.ExtensionFileLoader("kbit_kernel", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("kbit_kernel", loader))
    loader.exec_module(module)
    return module.matmul


@functools.lru_cache(maxsize=None)
def _kernel() -> ctypes.CDLL | None:
    try:
        try:
            return load(build())
        except Exception:
            if python_include() is None:
                raise
            # Python.h that does not compile or load (headers of another interpreter): the ctypes-only library
            # is the same kernel, a few microseconds a call slower
            return load(build(python=False))
    except Exception as e:  # never crash: the torch path computes the same thing, slower
        print(f"kbit: fused k-bit kernel unavailable ({e}); using the slower torch path "
              "(set KBIT_KERNEL=0 to silence this)", file=sys.stderr)
        return None


# KBIT_KERNEL=0 in the environment turns the kernel off for the process; read once, at import, because a
# batch-1 forward asks ~200 times a token and an environment lookup costs ~1 us. Tests and benchmarks that
# compare both paths in one process flip `ENABLED` (set_enabled).
ENABLED = os.environ.get("KBIT_KERNEL", "1") != "0"


# KBIT_EXACT=1: batch-1 decode of k = 4 (and k = 8 int) layers stays on the exact fp32 walk instead of the integer
# path (csrc/kbit_int16.h: x rounded to int16 per 32 values, the codebook to int16; ~1e-4 of a layer's largest
# output, the exact walk's model loss to 4 decimals: docs/SPEED.md).
EXACT = os.environ.get("KBIT_EXACT", "0") not in ("0", "")


def set_exact(on: bool) -> bool:
    """Exact fp32 batch-1 decode (True) or the integer path for k = 4 and k = 8 int (False, the default); returns
    the previous setting. Process-wide, like KBIT_EXACT."""
    global EXACT
    old, EXACT = EXACT, bool(on)
    if _kernel.cache_info().currsize:  # built: tell it now (a library built later reads EXACT when loaded)
        lib = _kernel()
        if lib is not None:
            lib.kbit_set_int16(0 if EXACT else 1)
    return old


def set_enabled(on: bool) -> bool:
    """Turn the kernel on or off for this process; returns the previous setting."""
    global ENABLED
    old, ENABLED = ENABLED, bool(on)
    return old


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (KBIT_KERNEL=0 / set_enabled(False), no compiler, failed build:
    warned once)."""
    return _kernel() if ENABLED else None


SIMD_PATHS = {0: "portable loop", 1: "AVX-512 VBMI", 2: "AVX2 + FMA"}


def describe() -> str:
    """Which kernel this process runs batch-1 k-bit matmuls with, for `kbit bench speed` (a slow machine's first
    question): its instruction set, whether the integer path runs, and how Python calls it, or why there is
    none."""
    if not ENABLED:
        return "off (KBIT_KERNEL=0): torch decodes slabs"
    lib = kernel()
    if lib is None:
        return "unavailable (no C compiler or a failed build): torch decodes slabs"
    integer = ("integer path for k = 4 / k = 8 int" + (" off (KBIT_EXACT=1)" if EXACT else "")
               if lib.kbit_has_int16() else "no integer path")
    return (f"{SIMD_PATHS.get(lib.kbit_has_simd(), '?')}, {integer}, "
            f"{'CPython entry point' if lib.fast_matmul is not None else 'ctypes (no Python.h)'}")


@functools.lru_cache(maxsize=256)
def _table256(values: bytes) -> torch.Tensor:
    """A codebook padded to 256 entries with NaN (codes past its end exist only in a damaged file)."""
    t = torch.full((256,), float("nan"))
    src = torch.frombuffer(bytearray(values), dtype=torch.float32)
    t[: src.numel()] = src
    return t


def table256(codebook: torch.Tensor) -> torch.Tensor:
    return _table256(codebook.detach().float().contiguous().numpy().tobytes())


class PackedWeight:
    """The kernel's view of one k-bit matrix: pointers into the caller's tensors, which must outlive it
    (it keeps references). Build once per module, call many times."""

    def __init__(self, codes, shape, bits, block, codebook, scales, scales_absmax=None, scales_offset=None,
                 transposed=False, dq_table=None):
        if scales.dtype not in SCALE_KINDS:
            raise ValueError(f"unsupported scale dtype {scales.dtype}")
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.transposed = bool(transposed)
        self.in_features, self.out_features = (self.rows, self.cols) if transposed else (self.cols, self.rows)
        self._keep = [codes.contiguous(), scales.contiguous(), table256(codebook)]
        w = Weight(codes=self._keep[0].data_ptr(), rows=self.rows, cols=self.cols, block=int(block), bits=int(bits),
                   scale_kind=SCALE_KINDS[scales.dtype], scales=self._keep[1].data_ptr(),
                   codebook=self._keep[2].data_ptr(), transposed=int(self.transposed))
        w.affine_zero, w.affine_step = affine_form(codebook)
        if scales.dtype == torch.uint8:
            self._keep += [table256(dq_table), scales_absmax.float().contiguous()]
            w.dq_table, w.dq_absmax = self._keep[3].data_ptr(), self._keep[4].data_ptr()
            w.dq_offset = float(scales_offset.reshape(-1)[0])
        self.struct = w
        self.ref = ctypes.byref(w)  # made once: generation calls each layer once per token, ~200 layers a token
        self.addr = ctypes.addressof(w)
        self.out_shapes: dict[torch.Size, tuple[int, ...]] = {}
        self.threads_cap = max(1, self.rows * self.cols // MIN_VALUES_PER_THREAD)

    def decode_rows(self, lib: ctypes.CDLL, r0: int, r1: int, threads: int | None = None) -> torch.Tensor:
        """fp32 rows [r0, r1) of the stored matrix, bit for bit core/blockwise.dequantize's values: the slab path's
        decoder (prefill, finetuning), ~10x faster than torch's gathers and bit unpacking."""
        out = torch.empty((r1 - r0, self.cols), dtype=torch.float32)
        n = max(1, min(threads or torch.get_num_threads(), (r1 - r0) * self.cols // MIN_VALUES_PER_THREAD))
        if lib.kbit_decode(self.ref, r0 * self.cols, r1 * self.cols, out.data_ptr(), n):
            raise ValueError(f"the kernel refused to decode rows [{r0}, {r1}) of a {self.rows}x{self.cols} weight")
        return out

    def out_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """The output's shape for an input of `shape` as a tuple of ints, checked, and remembered: a decode loop
        sees the same one or two shapes. Ints, not a torch.Size: torch.empty(1, 1, 576) parses in ~1.3 us,
        torch.empty(torch.Size(...)) in ~2.8 us, on a layer whose kernel call takes ~2.6 us (a 64x64 layer)."""
        out = self.out_shapes.get(shape)
        if out is None:
            if not shape or shape[-1] != self.in_features:
                raise ValueError(f"input has {shape[-1] if shape else 0} features, the weight takes {self.in_features}")
            out = tuple(int(d) for d in shape[:-1]) + (self.out_features,)
            if len(self.out_shapes) < 16:
                self.out_shapes[shape] = out
        return out

    def matmul(self, lib: ctypes.CDLL, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """x: [..., in] (any float dtype) -> fp32 [..., out]. As few torch calls as it takes (each costs ~0.5-2 us,
        which at batch 1 is a visible share of a small layer's time)."""
        shape = self.out_shape(x.shape)
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = torch.empty(*shape, dtype=torch.float32)
        n = min(threads or torch.get_num_threads(), self.threads_cap)
        m, fast = x.numel() // self.in_features, lib.fast_matmul
        if fast is not None:  # the CPython entry point: ~10 us a call less than ctypes in a decode step
            rc = fast(self.addr, x.data_ptr(), m, y.data_ptr(), n)
        else:
            rc = lib.kbit_matmul(self.ref, x.data_ptr(), m, y.data_ptr(), n)
        if rc:
            raise ValueError(f"the kernel refused k={self.struct.bits}, block={self.struct.block}")
        return y
