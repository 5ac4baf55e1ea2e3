"""The native k-bit checkpoint: safetensors files whose header metadata describes each quantized tensor.

See docs/FORMAT.md for the specification. In short, a quantized tensor T is stored as
`T.codes` (u8, dense MSB-first k-bit codes), `T.scales` (one per block), optionally `T.scales_absmax` +
`T.scales_offset` (double quantization) and `T.codebook` (quantile type); the table of a fixed data type is
stored once per file as `kbit.codebook.<dtype><k>`. Dense tensors keep their name, dtype and shape.
The header's `__metadata__` carries `format = "kbit"`, `kbit.format_version` and `kbit.tensors`, a JSON
object {T: {bits, block_size, dtype, double_quant, scale_dtype, shape, orig_dtype, codebook[, scales_codebook]}}.
"""

from __future__ import annotations

import json
import os

import torch

from kbitcli.core.blockwise import QuantizedTensor, Spec
from kbitcli.errors import bad_input
from kbitcli.formats.source import _short, open_safetensors

FORMAT_VERSION = 1
MANIFEST = "kbit_manifest.json"
REMAP_BYTES = 64 << 20
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def tensor_meta(tp) -> dict:
    s = tp.spec
    meta = {"bits": s.bits, "block_size": s.block_size, "dtype": s.dtype, "double_quant": s.double_quant,
            "scale_dtype": s.scale_dtype, "scale_search": s.scale_search, "method": s.method, "shape": list(tp.shape), "orig_dtype": DTYPE_NAMES[tp.dtype],
            "codebook": f"{tp.name}.codebook" if s.dtype == "quantile" else f"kbit.codebook.{s.dtype}{s.bits}"}
    if s.double_quant:
        meta["scales_codebook"] = "kbit.codebook.dynamic8"  # the table the 8-bit scale codes index
    return meta


def file_metadata(tensor_metas: dict[str, dict]) -> dict[str, str]:
    return {"format": "kbit", "kbit.format_version": str(FORMAT_VERSION),
            "kbit.tensors": json.dumps(tensor_metas, separators=(",", ":"))}


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def is_kbit_file(metadata: dict | None) -> bool:
    return bool(metadata) and metadata.get("format") == "kbit"


class KbitCheckpoint:
    """Read side of the native format: a single file or a folder of shards (+ index, config, manifest)."""

    def __init__(self, path: str):
        self.path = path
        self.is_folder = os.path.isdir(path)
        self.config: dict | None = None
        self.manifest: dict | None = None
        if self.is_folder:
            files = self._folder_files(path)
            cfg = os.path.join(path, "config.json")
            if os.path.exists(cfg):
                with open(cfg) as fh:
                    self.config = json.load(fh)
            man = os.path.join(path, MANIFEST)
            if os.path.exists(man):
                with open(man) as fh:
                    self.manifest = json.load(fh)
        else:
            files = [path]
        self.files = files
        self.handles = {}
        self._read: dict[str, int] = {}  # bytes read through each handle since it was opened
        self.names: list[str] = []  # original tensor names, file order
        self.meta: dict[str, dict | None] = {}  # name -> quantization metadata (None: dense)
        self.where: dict[str, str] = {}  # key -> file
        for f in files:
            h = open_safetensors(f)
            self.handles[f] = h
            md = h.metadata() or {}
            if not is_kbit_file(md):
                raise bad_input(f"{f}: not a kbit checkpoint (no 'format: kbit' metadata); encode it with `kbit encode`")
            version = int(md.get("kbit.format_version", "0"))
            if version > FORMAT_VERSION:
                raise bad_input(f"{f}: kbit format version {version} is newer than this kbit reads ({FORMAT_VERSION}); upgrade kbit")
            try:
                tensors = json.loads(md.get("kbit.tensors", "{}"))
            except ValueError as e:
                raise bad_input(f"{f}: damaged kbit metadata ({_short(e)})") from None
            keys = list(h.keys())
            for k in keys:
                self.where[k] = f
            component = {f"{t}.{s}" for t in tensors for s in ("codes", "scales", "scales_absmax", "scales_offset", "codebook")}
            for k in keys:
                if k in tensors:
                    raise bad_input(f"{f}: tensor {k!r} is both dense and quantized; the file is damaged")
                if k in component or k.startswith("kbit.codebook."):
                    continue
                self.names.append(k)
                self.meta[k] = None
            for t, m in tensors.items():
                if f"{t}.codes" not in self.where:
                    raise bad_input(f"{f}: quantized tensor {t!r} has no codes; the file is damaged")
                self.names.append(t)
                self.meta[t] = m
        self._order()

    def _order(self):
        # restore the source order recorded in the manifest when there is one
        if self.manifest and "tensors" in self.manifest:
            rank = {t["name"]: i for i, t in enumerate(self.manifest["tensors"])}
            self.names.sort(key=lambda n: rank.get(n, len(rank)))

    @staticmethod
    def _folder_files(path: str) -> list[str]:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                files = list(dict.fromkeys(json.load(fh)["weight_map"].values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise bad_input(f"{index} names shard {missing[0]!r}, which is missing")
            return [os.path.join(path, f) for f in files]
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(single):
            return [single]
        raise bad_input(f"{path}: no model.safetensors or model.safetensors.index.json; is it a kbit checkpoint?")

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise bad_input(f"{self.path}: tensor {key!r} is missing; the checkpoint is damaged")
        f = self.where[key]
        t = self.handles[f].get_tensor(key)
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
        m = self.meta[name]
        spec = Spec(m["bits"], m["block_size"], m["dtype"], m["double_quant"], m["scale_dtype"])
        dq = m["double_quant"]
        return QuantizedTensor(
            spec, tuple(m["shape"]), NAME_DTYPES[m["orig_dtype"]], self._get(f"{name}.codes"), self._get(f"{name}.scales"),
            self._get(m["codebook"]).float(),
            self._get(f"{name}.scales_absmax") if dq else None, self._get(f"{name}.scales_offset") if dq else None)

    def shape(self, name: str) -> tuple[int, ...]:
        m = self.meta[name]
        if m is not None:
            return tuple(m["shape"])
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def orig_dtype(self, name: str) -> torch.dtype:
        m = self.meta[name]
        if m is not None:
            return NAME_DTYPES[m["orig_dtype"]]
        from kbitcli.formats.safetensors_stream import TORCH_DTYPES

        return TORCH_DTYPES[self.handles[self.where[name]].get_slice(name).get_dtype()]

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as the original model had it (dequantized if needed), in `dtype` (default: original)."""
        from kbitcli.core.blockwise import dequantize

        if self.is_quantized(name):
            qt = self.quantized(name)
            return dequantize(qt, dtype or qt.orig_dtype)
        t = self.dense(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def looks_kbit(path: str) -> bool:
    """True if path is a kbit checkpoint (file or folder), judged by its header metadata only."""
    try:
        if os.path.isdir(path):
            files = KbitCheckpoint._folder_files(path)
        else:
            files = [path]
        return is_kbit_file(open_safetensors(files[0]).metadata())
    except Exception:
        return False
