"""The native k-bit checkpoint: safetensors files whose header metadata describes each quantized tensor.

See docs/FORMAT.md for the specification. In short, a quantized tensor T is stored as
`T.codes` (u8, dense MSB-first k-bit codes), `T.scales` (one per block), optionally `T.scales_absmax` +
`T.scales_offset` (double quantization) and `T.codebook` (quantile type); the table of a fixed data type is
stored once per file as `kbit.codebook.<dtype><k>`. Dense tensors keep their name, dtype and shape.
The header's `__metadata__` carries `format = "kbit"`, `kbit.format_version` and `kbit.tensors`, a JSON
object {T: {bits, block_size, dtype, double_quant, scale_dtype, shape, orig_dtype, codebook[, scales_codebook]}}.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch

from kbitcli.core.blockwise import SCALE_DTYPES, QuantizedTensor, Spec, finite, layout, layout_bits
from kbitcli.core.codebooks import DTYPES, MAX_BITS, MIN_BITS, fixed_codebook
from kbitcli.errors import KbitError, bad_input
from kbitcli.formats.source import KBIT_PARTS
from kbitcli.io.dtypes import config_name, from_name, from_safetensors, safetensors_name
from kbitcli.io.folder import Folder, open_safetensors, read_header
from kbitcli.io.folder import short_error as _short
from kbitcli.io.manifest import read_manifest
from kbitcli.recipes import METHODS

FORMAT_VERSION = 1
REMAP_BYTES = 64 << 20
# the dtypes a quantized tensor may come from (its `orig_dtype`, as config.json names them)
ORIG_DTYPES = ("float32", "float16", "bfloat16", "float64")


def informative(m: dict) -> tuple[int, str, bool]:
    """How the encoder chose codes and scales (scale_search, method, scale_refit), kept in the Spec a reader
    returns so that saving what was loaded writes the same metadata again. Decoding never depends on them, so a
    file without them (written before they existed) or with values this version does not know reads as the
    plain defaults instead of failing."""
    search = m.get("scale_search")
    search = search if isinstance(search, int) and not isinstance(search, bool) and search >= 1 else 1
    method = m.get("method") if m.get("method") in METHODS else "rtn"
    return search, method, m.get("scale_refit") is True


def tensor_meta(tp) -> dict:
    s = tp.spec
    meta = {"bits": s.bits, "block_size": s.block_size, "dtype": s.dtype, "double_quant": s.double_quant,
            "scale_dtype": s.scale_dtype, "scale_search": s.scale_search, "scale_refit": s.scale_refit, "method": s.method, "shape": list(tp.shape), "orig_dtype": config_name(tp.dtype),
            "codebook": f"{tp.name}.codebook" if s.dtype == "quantile" else f"kbit.codebook.{s.dtype}{s.bits}"}
    if s.double_quant:
        meta["scales_codebook"] = "kbit.codebook.dynamic8"  # the table the 8-bit scale codes index
    return meta


def file_metadata(tensor_metas: dict[str, dict]) -> dict[str, str]:
    return {"format": "kbit", "kbit.format_version": str(FORMAT_VERSION),
            "kbit.tensors": json.dumps(tensor_metas, separators=(",", ":"))}


@functools.lru_cache(maxsize=1024)
def expected_parts(spec: Spec, numel: int) -> tuple:
    """((suffix, (safetensors dtype, shape)), ...) a quantized tensor's parts must have; suffix None is its
    codebook. Cached: a model repeats a few (spec, size) pairs many times, and decode checks every read."""
    parts = [(suffix, (safetensors_name(dtype), shape)) for suffix, (dtype, shape) in layout(spec, numel).items()]
    return tuple(parts) + ((None, ("F32", (_table_len(spec.dtype, spec.bits),))),)


def stored_entries(path: str) -> dict[str, tuple[str, tuple]]:
    """key -> (dtype, shape) from a safetensors file's header, read once at open for the per-read part checks."""
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in read_header(path)[1].items() if k != "__metadata__"}


def is_kbit_file(metadata: dict | None) -> bool:
    return bool(metadata) and metadata.get("format") == "kbit"


class KbitCheckpoint:
    """Read side of the native format: a single file or a folder of shards (+ index, config, manifest)."""

    format = "kbit"

    def __init__(self, path: str):
        self.folder = Folder(path, pickles=False, suffixes=(".safetensors",))
        self.path, self.is_folder, self.config = path, self.folder.is_folder, self.folder.config
        self.manifest: dict | None = read_manifest(path) if self.is_folder else None
        self.files = files = self.folder.files
        self.handles = {}
        self._read: dict[str, int] = {}  # bytes read through each handle since it was opened
        self.names: list[str] = []  # original tensor names, file order
        self.meta: dict[str, dict | None] = {}  # name -> quantization metadata (None: dense)
        self.where: dict[str, str] = {}  # key -> file
        self._checked: set[tuple[str, str]] = set()  # (file, shared table) found finite
        self.stored: dict[str, tuple[str, tuple]] = {}  # key -> (dtype, shape) as the file's header stores it
        for f in files:
            h = open_safetensors(f)
            self.handles[f] = h
            self.stored.update(stored_entries(f))
            md = h.metadata() or {}
            if not is_kbit_file(md):
                codes = next((k for k in h.keys() if k.endswith(".codes")), None)
                if codes is not None:  # kbit's parts with the metadata that describes them stripped
                    raise self._damaged(f, codes[: -len(".codes")], "it has codes but the file has no kbit metadata")
                raise bad_input(f"{f}: not a kbit checkpoint (no 'format: kbit' metadata); encode it with `kbit encode`")
            if "kbit.format_version" not in md:  # every kbit file has one: without it no version check is possible
                raise self._damaged(f, "kbit.format_version", "the file's metadata has none")
            version = md["kbit.format_version"]
            # ASCII digits only, and short: str.isdigit() also accepts '²' (which int() refuses) and int() refuses
            # more than 4300 digits; both were "internal error"s
            version = int(version) if version.isascii() and version.isdigit() and len(version) <= 9 else -1
            if version < 0:
                shown = md["kbit.format_version"][:20]
                raise self._damaged(f, "kbit.format_version", f"its metadata is {shown!r}, not a number")
            if version > FORMAT_VERSION:
                raise bad_input(f"{f}: kbit format version {version} is newer than this kbit reads ({FORMAT_VERSION}); upgrade kbit")
            try:
                tensors = json.loads(md.get("kbit.tensors", "{}"))
            except (ValueError, RecursionError) as e:  # RecursionError: valid JSON nested too deep for Python
                raise self._damaged(f, "kbit.tensors", f"its metadata is not JSON: {_short(e)}") from None
            if not isinstance(tensors, dict):
                raise self._damaged(f, "kbit.tensors", "its metadata is not a JSON object")
            keys = list(h.keys())
            for k in keys:
                if k.startswith("kbit.codebook."):  # the fixed tables are stored once per file
                    self.where.setdefault(k, f)
                    continue
                if k in self.where:
                    raise self._damaged(f, k, f"it is also in {os.path.basename(self.where[k])}")
                self.where[k] = f
            component = {f"{t}.{s}" for t in tensors for s in KBIT_PARTS}
            for k in keys:
                if k in tensors:
                    raise self._damaged(f, k, "it is both dense and quantized")
                if k in component or k.startswith("kbit.codebook."):
                    continue
                if k.endswith(".codes"):  # codes nobody describes: read as a dense weight they would be garbage
                    raise self._damaged(f, k[: -len(".codes")], "it has codes but no kbit.tensors metadata entry")
                self.names.append(k)
                self.meta[k] = None
            for t, m in tensors.items():
                if f"{t}.codes" not in self.where:
                    raise self._damaged(f, t, "it has no codes")
                check_meta(m, lambda what, t=t: self._damaged(f, t, what))
                self.names.append(t)
                self.meta[t] = m
        self._order()

    def _order(self):
        # restore the source order recorded in the manifest when there is one
        tensors = (self.manifest or {}).get("tensors") if isinstance(self.manifest, dict) else None
        if isinstance(tensors, list):  # only string names: a list or object there is unhashable (was a TypeError)
            rank = {t["name"]: i for i, t in enumerate(tensors) if isinstance(t, dict) and isinstance(t.get("name"), str)}
            self.names.sort(key=lambda n: rank.get(n, len(rank)))

    def _damaged(self, file: str, name: str, what: str) -> KbitError:
        """Exit 1: the checkpoint does not hold what its metadata says; decoding it would give garbage."""
        return KbitError(f"{file}: tensor {name!r} is damaged ({what}); run `kbit inspect {self.path} --verify` to "
                         "check every file against the manifest, then re-encode or restore it", exit_code=1)

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise self._damaged(self.path, key, "it is missing")
        f = self.where[key]
        try:
            t = self.handles[f].get_tensor(key)
        except Exception as e:  # safetensors' own error types: the bytes do not match the header
            raise self._damaged(f, key, f"unreadable: {_short(e)}") from None
        # safe_open memory-maps the file, and the pages a read touches stay resident (counted in RSS) while
        # the mapping lives: re-open after every REMAP_BYTES read so memory does not grow with the model
        self._read[f] = self._read.get(f, 0) + t.nbytes
        if self._read[f] > REMAP_BYTES:
            self.handles[f], self._read[f] = open_safetensors(f), 0
        return t

    def is_quantized(self, name: str) -> bool:
        return self.meta[name] is not None

    def dense(self, name: str) -> torch.Tensor:
        return self._get(name)

    def quantized(self, name: str) -> QuantizedTensor:
        """The stored parts of a quantized tensor, checked on every read against what its metadata implies:
        each part's dtype and shape (from the header: no data read), finite scales and codebook (one pass over
        a few values per block, never over the codes). Damage is exit 1 naming the tensor."""
        m = self.meta[name]
        spec = Spec(m["bits"], m["block_size"], m["dtype"], m["double_quant"], m["scale_dtype"], *informative(m))
        # dict lookups in the header parsed at open (no I/O per read), against what the metadata implies
        for suffix, want in expected_parts(spec, math.prod(m["shape"])):
            key = m["codebook"] if suffix is None else f"{name}.{suffix}"  # the table: shared, or the tensor's own
            got = self.stored.get(key)
            if got != want:
                if got is None:
                    raise self._damaged(self.path, name, f"part {key!r} is missing")
                raise self._damaged(self.where[key], name, f"{key} is {got[0]} {list(got[1])}, its metadata "
                                    f"implies {want[0]} {list(want[1])}")
        dq = m["double_quant"]
        qt = QuantizedTensor(
            spec, tuple(m["shape"]), from_name(m["orig_dtype"]), self._get(f"{name}.codes"), self._get(f"{name}.scales"),
            self._get(m["codebook"]).float(),
            self._get(f"{name}.scales_absmax") if dq else None, self._get(f"{name}.scales_offset") if dq else None)
        shared = (self.where[m["codebook"]], m["codebook"])  # a fixed table is checked once per file
        for what, t in (("codebook", None if shared in self._checked else qt.codebook),
                        ("scales", None if dq else qt.scales),
                        ("scales_absmax", qt.scales_absmax), ("scales_offset", qt.scales_offset)):
            # the codes are never read here: a few values per block
            if t is not None and not finite(t):
                raise self._damaged(self.where[f"{name}.codes"], name, f"NaN or Inf in its {what}")
        if m["codebook"].startswith("kbit.codebook."):
            self._checked.add(shared)
        return qt

    def shape(self, name: str) -> tuple[int, ...]:
        m = self.meta[name]
        if m is not None:
            return tuple(m["shape"])
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def orig_dtype(self, name: str) -> torch.dtype:
        m = self.meta[name]
        if m is not None:
            return from_name(m["orig_dtype"])
        stored = self.handles[self.where[name]].get_slice(name).get_dtype()
        if from_safetensors(stored) is None:  # kbit never writes one: the file was edited or is not ours
            raise self._damaged(self.where[name], name, f"it is stored as {stored}, which kbit never writes")
        return from_safetensors(stored)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as the original model had it (dequantized if needed), in `dtype` (default: original)."""
        from kbitcli.core.blockwise import dequantize

        if self.is_quantized(name):
            qt = self.quantized(name)
            return dequantize(qt, dtype or qt.orig_dtype)
        t = self.dense(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def describe(self, name: str) -> dict:
        m = self.meta[name]
        if m is None:
            dt = self.orig_dtype(name)
            return {"bytes": dt.itemsize * math.prod(self.shape(name)), "data_type": config_name(dt)}
        bits = layout_bits(Spec(m["bits"], m["block_size"], m["dtype"], m["double_quant"], m["scale_dtype"]),
                           math.prod(m["shape"]))
        return {"bytes": bits // 8, "bits": m["bits"], "block_size": m["block_size"], "data_type": m["dtype"],
                "double_quant": m["double_quant"]}

    def write_side_files(self, folder: str) -> None:
        self.folder.copy_side_files(folder)


def check_meta(m, damaged) -> None:
    """The per-tensor metadata has every field, of the right type and range (checked when the file is opened, so
    inspect, decode and load never meet a half-described tensor). damaged(what) -> the exception to raise."""
    if not isinstance(m, dict):
        raise damaged("its metadata is not a JSON object")
    checks = {"bits": lambda v: _is_int(v) and MIN_BITS <= v <= MAX_BITS, "block_size": lambda v: _is_int(v) and v >= 1,
              "dtype": lambda v: v in DTYPES, "double_quant": lambda v: isinstance(v, bool),
              "scale_dtype": lambda v: v in SCALE_DTYPES, "orig_dtype": lambda v: v in ORIG_DTYPES,
              "codebook": lambda v: isinstance(v, str) and v != "",
              # no zero-size dimension: kbit copies empty tensors dense, and one described as quantized made inspect
              # divide by its 0 values
              "shape": lambda v: isinstance(v, list) and all(_is_int(d) and d >= 1 for d in v)}
    for key, ok in checks.items():
        try:
            good = key in m and ok(m[key])
        except TypeError:  # an unhashable value (a list where a name belongs)
            good = False
        if not good:
            raise damaged(f"its metadata has {'no ' + key if key not in m else 'a bad ' + key}")


@functools.lru_cache(maxsize=None)
def _table_len(dtype: str, bits: int) -> int:
    """Entries of the table a tensor's codes index: 2^k for quantile; a fixed type's own length (int8: 255)."""
    return 2 ** bits if dtype == "quantile" else len(fixed_codebook(dtype, bits))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
