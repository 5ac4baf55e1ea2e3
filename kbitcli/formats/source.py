"""Read a dense checkpoint tensor by tensor: a .safetensors file, a .bin file, or a Hugging Face model folder.

Nothing is loaded until asked for: safetensors files are opened lazily (mmap) and `.bin` files are loaded
with torch.load(weights_only=True, mmap=True), which refuses pickles that would run code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError

from kbitcli.errors import bad_input
from kbitcli.io.dtypes import from_safetensors, safetensors_name
from kbitcli.io.folder import Folder, load_bin, open_safetensors, read_header, short_error

# what a k-bit checkpoint stores beside a quantized tensor T, as `T.<part>` (docs/FORMAT.md 2.2)
KBIT_PARTS = ("codes", "scales", "scales_absmax", "scales_offset", "codebook")


def _refuse_dtype(file: str, name: str, dtype: str) -> None:
    """fp8 checkpoints carry per-block scales of their own (weight_scale_inv) that a plain copy would drop, and
    unsigned 16/32/64-bit tensors have no torch arithmetic: kbit reads neither, and says so up front."""
    fp8 = " (an fp8 model: dequantize it with its own scales)" if dtype.upper().startswith(("F8", "FLOAT8")) else ""
    raise bad_input(f"{file}: tensor {name!r} is stored as {dtype}, which kbit does not read; convert the "
                    f"checkpoint to bf16/fp16/fp32 first{fp8}")


@dataclass
class Source:
    """A dense checkpoint. names: tensor names in file order; files: the weight files (folder.files)."""

    folder: Folder
    format = "dense"
    names: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> file
    metadata: dict[str, str] = field(default_factory=dict)  # header metadata of the first safetensors file
    _handles: dict = field(default_factory=dict, repr=False)
    _headers: dict = field(default_factory=dict, repr=False)  # safetensors file -> (data start, header)

    @property
    def path(self) -> str:
        return self.folder.path

    @property
    def is_folder(self) -> bool:
        return self.folder.is_folder

    @property
    def files(self) -> list[str]:
        return self.folder.files

    @property
    def config(self) -> dict | None:
        return self.folder.config

    # the reader protocol (formats/protocol.py): a dense checkpoint is its own decoded form
    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name)[1]

    def orig_dtype(self, name: str) -> torch.dtype:
        return self.info(name)[0]

    def is_quantized(self, name: str) -> bool:
        return False

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.get(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def describe(self, name: str) -> dict:
        dt, shape = self.info(name)
        return {"bytes": dt.itemsize * int(torch.Size(shape).numel()), "data_type": str(dt).removeprefix("torch.")}

    def write_side_files(self, folder: str) -> None:
        self.folder.copy_side_files(folder)

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = open_safetensors(file) if file.endswith(".safetensors") else load_bin(file)
        return self._handles[file]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        h = self._handle(self.where[name])
        if isinstance(h, dict):
            t = h[name]
            if safetensors_name(t.dtype) is None:
                _refuse_dtype(self.where[name], name, str(t.dtype).removeprefix("torch."))
            return t.dtype, tuple(t.shape)
        sl = h.get_slice(name)
        dtype = from_safetensors(sl.get_dtype())
        if dtype is None:
            _refuse_dtype(self.where[name], name, sl.get_dtype())
        return dtype, tuple(sl.get_shape())

    def get(self, name: str) -> torch.Tensor:
        h = self._handle(self.where[name])
        try:
            if isinstance(h, dict):
                return h[name]
            # A plain read of the tensor's bytes at the offsets the header gives (parsed once per file): a
            # long-lived mmap would keep every page a read touched resident (RSS grows to the whole file), and
            # a fresh safe_open per tensor re-parses the header each time (quadratic in the tensor count).
            return self._read(name)
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
            raise bad_input(f"{self.where[name]}: cannot read tensor {name!r} ({short_error(e)}); the file is damaged") from None

    def _read(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        base, header = self._headers[file]
        entry = header[name]
        dtype, shape = from_safetensors(entry["dtype"]), tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        size = end - begin
        if size != dtype.itemsize * int(torch.Size(shape).numel()):
            raise OSError(f"{size} bytes for {entry['dtype']} {list(shape)}")
        with open(file, "rb") as fh:
            fh.seek(base + begin)
            buf = bytearray(size)
            if fh.readinto(buf) != size:
                raise OSError("the file ends before the tensor's bytes")
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

def open_source(path: str) -> Source:
    src = Source(Folder(path))
    for file in src.files:
        h = src._handle(file)
        keys = list(h.keys())
        if not isinstance(h, dict) and not src.metadata:
            src.metadata = h.metadata() or {}
        elif isinstance(h, dict):
            bad = [k for k, v in h.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise bad_input(f"{file}: entry {bad[0]!r} is not a tensor; save a plain state dict")
        for k in keys:
            if k in src.where:  # e.g. a stale shard of an older download: which copy is right is unknowable
                raise bad_input(f"{path}: tensor {k!r} is in both {os.path.basename(src.where[k])} and "
                                f"{os.path.basename(file)}; remove the stale shard or fix the index")
            src.where[k] = file
            src.names.append(k)
    if not src.names:
        raise bad_input(f"{path}: holds no tensors")
    # A k-bit checkpoint stores `T.scales`, `T.codebook`... beside a quantized T, and shared `kbit.codebook.*`
    # tables: a source tensor named like one collided with kbit's own part in the output (an internal error) or
    # was dropped as a table on decode (exit 0, a tensor missing). A k-bit checkpoint itself (format: kbit, or
    # `T.codes`) is left to encode, which refuses it as already quantized.
    names = set(src.names)
    kbit_like = src.metadata.get("format") == "kbit" or any(n.endswith(".codes") for n in names)
    for k in [] if kbit_like else src.names:
        stem, _, part = k.rpartition(".")
        if k.startswith("kbit.") or (part in KBIT_PARTS and stem in names):
            why = "names starting 'kbit.'" if k.startswith("kbit.") else f"'{part}' beside the tensor {stem!r}"
            raise bad_input(f"{path}: tensor {k!r} has a name kbit keeps for its own parts ({why}); rename it in "
                            "the checkpoint first")
    return src
