"""Read a dense checkpoint tensor by tensor: a .safetensors file, a .bin file, or a Hugging Face model folder.

Nothing is loaded until asked for: safetensors files are opened lazily (mmap) and `.bin` files are loaded
with torch.load(weights_only=True, mmap=True), which refuses pickles that would run code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from kbitcli.errors import bad_input

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# what a k-bit checkpoint stores beside a quantized tensor T, as `T.<part>` (docs/FORMAT.md 2.2)
KBIT_PARTS = ("codes", "scales", "scales_absmax", "scales_offset", "codebook")
# files of a model folder that are not weights and travel with the checkpoint unchanged
SIDE_FILE_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json", "kbit_manifest.json"}


def open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise bad_input(f"{path}: not a readable safetensors file ({_short(e)}); re-download or re-export it") from None


def load_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise bad_input(
            f"{path}: refused to unpickle (it holds more than tensors: {_short(e)}); convert it to safetensors "
            "with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise bad_input(f"{path}: not a readable PyTorch checkpoint ({_short(e)}); re-download it") from None
    # torch.save() takes any object: a whole model's weights are a dict of name -> tensor (a state dict)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise bad_input(f"{path}: holds a {type(state).__name__}, not a state dict (tensor name -> tensor); save "
                        "model.state_dict() instead")
    return state


def _refuse_dtype(file: str, name: str, dtype: str) -> None:
    """fp8 checkpoints carry per-block scales of their own (weight_scale_inv) that a plain copy would drop, and
    unsigned 16/32/64-bit tensors have no torch arithmetic: kbit reads neither, and says so up front."""
    fp8 = " (an fp8 model: dequantize it with its own scales)" if dtype.upper().startswith(("F8", "FLOAT8")) else ""
    raise bad_input(f"{file}: tensor {name!r} is stored as {dtype}, which kbit does not read; convert the "
                    f"checkpoint to bf16/fp16/fp32 first{fp8}")


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


@dataclass
class Source:
    """A dense checkpoint. names: tensor names in file order; files: the weight files."""

    path: str
    is_folder: bool
    files: list[str]
    names: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> file
    config: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # header metadata of the first safetensors file
    _handles: dict = field(default_factory=dict, repr=False)
    _headers: dict = field(default_factory=dict, repr=False)  # safetensors file -> (data start, header)

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = open_safetensors(file) if file.endswith(".safetensors") else load_bin(file)
        return self._handles[file]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        h = self._handle(self.where[name])
        if isinstance(h, dict):
            from kbitcli.formats.safetensors_stream import ST_DTYPES

            t = h[name]
            if t.dtype not in ST_DTYPES:
                _refuse_dtype(self.where[name], name, str(t.dtype).removeprefix("torch."))
            return t.dtype, tuple(t.shape)
        sl = h.get_slice(name)
        from kbitcli.formats.safetensors_stream import TORCH_DTYPES

        if sl.get_dtype() not in TORCH_DTYPES:
            _refuse_dtype(self.where[name], name, sl.get_dtype())
        return TORCH_DTYPES[sl.get_dtype()], tuple(sl.get_shape())

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
            raise bad_input(f"{self.where[name]}: cannot read tensor {name!r} ({_short(e)}); the file is damaged") from None

    def _read(self, name: str) -> torch.Tensor:
        from kbitcli.formats.safetensors_stream import TORCH_DTYPES

        file = self.where[name]
        if file not in self._headers:
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        base, header = self._headers[file]
        entry = header[name]
        dtype, shape = TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])
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

    def side_files(self) -> list[str]:
        """Small non-weight files and folders (tokenizer, generation config, README, sentence-transformers'
        `1_Pooling/`...) of a model folder, to copy along."""
        return side_files(self.path) if self.is_folder else []


def side_files(folder: str) -> list[str]:
    """Top-level entries of a model folder that are neither weights, indexes, config.json nor manifests."""
    out = []
    for f in sorted(os.listdir(folder)):
        full = os.path.join(folder, f)
        if f.startswith(".") or f in SIDE_FILE_SKIP or f.endswith(WEIGHT_SUFFIXES + (".gguf", ".manifest.json")):
            continue
        if os.path.isfile(full) or (os.path.isdir(full) and not _holds_weights(full)):
            out.append(full)
    return out


def _holds_weights(folder: str) -> bool:
    return any(f.endswith(WEIGHT_SUFFIXES + (".gguf",)) for _, _, files in os.walk(folder) for f in files)


def copy_side_files(folder: str, dst_folder: str) -> None:
    for side in side_files(folder):
        target = os.path.join(dst_folder, os.path.basename(side))
        if os.path.isdir(side):
            shutil.copytree(side, target)
        else:
            shutil.copy2(side, target)


def _folder_files(path: str) -> list[str]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            return index_files(path, index)
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise bad_input(
        f"{path}: no model.safetensors, sharded index or pytorch_model.bin found; point at a model folder or a file"
    )


def index_files(folder: str, index: str) -> list[str]:
    """The shard files a `*.index.json` names, in order: a weight_map of tensor -> file name, each file inside
    the folder and present."""
    try:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise bad_input(f"{index}: not a valid shard index ({_short(e)}); re-download the model") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise bad_input(f"{index}: weight_map must map each tensor name to a shard file name; re-download the model")
    files = [inside(folder, f, index) for f in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise bad_input(f"{index} names shard {os.path.relpath(missing[0], folder)!r}, which is missing; "
                        "re-download the model")
    return files


def inside(root: str, name, where: str) -> str:
    """root/name, refusing a name that is absolute or climbs out of root with `..` (a hostile index or manifest
    must not make kbit read, hash or follow files elsewhere). Lexical: symlinked files (Hugging Face's cache
    links every file into blobs/) stay readable."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or \
            os.path.normpath(name).split(os.sep)[0] == ".." or "\0" in name:
        raise bad_input(f"{where}: names {str(name)[:100]!r}, a path outside {root}; every file of a checkpoint "
                        "must be inside its folder")
    return os.path.join(root, name)


def open_source(path: str) -> Source:
    if not os.path.exists(path):
        raise bad_input(f"{path}: no such file or folder")
    if os.path.isdir(path):
        files = _folder_files(path)
        config = None
        cfg = os.path.join(path, "config.json")
        if os.path.exists(cfg):
            try:
                with open(cfg) as fh:
                    config = json.load(fh)
            except (ValueError, UnicodeDecodeError) as e:
                raise bad_input(f"{cfg}: not valid JSON ({_short(e)})") from None
            if not isinstance(config, dict):
                raise bad_input(f"{cfg}: holds a JSON {type(config).__name__}, not an object of settings; "
                                "restore the model's config.json")
        src = Source(path, True, files, config=config)
    else:
        if not path.endswith(WEIGHT_SUFFIXES):
            raise bad_input(f"{path}: expected a .safetensors or .bin file, or a model folder")
        src = Source(path, False, [path])
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
