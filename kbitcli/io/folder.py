"""The one folder reader: which files of a checkpoint hold its weights, its config.json, and the side files
(tokenizer, generation config, README, sentence-transformers' `1_Pooling/`...) that travel with it.

Every format reads through this module (formats/source.py, formats/kbit_format.py, the foreign readers), so
each rule is made once:
  - a folder's weights are the files its `*.index.json` names (a weight_map of tensor -> shard), or the single
    `model.safetensors` / `pytorch_model.bin`; every name is resolved *inside* the folder (`../x` and absolute
    paths are refused: a hostile index must not make kbit read, hash or follow files elsewhere);
  - JSON (config, index, manifest) is parsed with errors that name the file, and must be an object;
  - safetensors files are opened by safetensors itself, `.bin` files with torch.load(weights_only=True), which
    refuses pickles that would run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile

import torch
from safetensors import SafetensorError, safe_open

from kbitcli.errors import bad_input

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX = "model.safetensors.index.json"
# (index, single file) pairs a Hugging Face folder may hold its weights in, in order of preference
LAYOUTS = ((INDEX, "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
# files of a model folder that are not weights and are not copied along (each output writes its own)
SIDE_FILE_SKIP = {INDEX, "pytorch_model.bin.index.json", "config.json", "kbit_manifest.json"}


HUB_ID = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")


def missing_path_error(path: str):
    """The error for an input path that does not exist. A Hugging Face Hub id (`org/name`) gets the command that
    downloads it: kbit reads local checkpoints only."""
    text = os.fspath(path)
    if HUB_ID.fullmatch(text) and not text.startswith(".") and text.count("/") == 1:
        name = text.split("/")[1]
        return bad_input(f"{text}: no such file or folder; kbit reads local checkpoints: download it first with "
                         f"`huggingface-cli download {text} --local-dir {name}`")
    return bad_input(f"{text}: no such file or folder")


def short_error(e: Exception) -> str:
    """The first line of an exception's message, bounded: what a one-line error quotes of a library's error."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def inside(root: str, name, where: str) -> str:
    """root/name, refusing a name that is absolute or climbs out of root with `..`. Lexical: symlinked files
    (Hugging Face's cache links every file into blobs/) stay readable."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or \
            os.path.normpath(name).split(os.sep)[0] == ".." or "\0" in name:
        raise bad_input(f"{where}: names {str(name)[:100]!r}, a path outside {root}; every file of a checkpoint "
                        "must be inside its folder")
    return os.path.join(root, name)


def read_json(path: str, *, required: bool = False, what: str = "an object"):
    """The JSON object in `path` (None if the file is absent and not required)."""
    if not os.path.exists(path):
        if required:
            raise bad_input(f"{path}: not found")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad_input(f"{path}: not valid JSON ({short_error(e)}); restore it from the original") from None
    if not isinstance(obj, dict):
        raise bad_input(f"{path}: holds a JSON {type(obj).__name__}, not {what}; restore it from the original")
    return obj


def open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise bad_input(f"{path}: not a readable safetensors file ({short_error(e)}); re-download or re-export it") from None


def load_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        # mmap needs the zip format torch.save has written since 1.6; an older (legacy, non-zip) file, such as
        # torchvision's ImageNet weights, is read whole: same weights-only unpickler, same refusals
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise bad_input(
            f"{path}: refused to unpickle (it holds more than tensors: {short_error(e)}); convert it to safetensors "
            "with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise bad_input(f"{path}: not a readable PyTorch checkpoint ({short_error(e)}); re-download it") from None
    # torch.save() takes any object: a whole model's weights are a dict of name -> tensor (a state dict)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise bad_input(f"{path}: holds a {type(state).__name__}, not a state dict (tensor name -> tensor); save "
                        "model.state_dict() instead")
    return state


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file, parsed once by the readers that need the
    entries themselves: the dense reader reads tensors at their offsets, the native one checks part shapes."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def index_files(folder: str, index: str) -> list[str]:
    """The shard files a `*.index.json` names, in order: each inside the folder and present."""
    obj = read_json(index, required=True, what="an object (a shard index)")
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise bad_input(f"{index}: weight_map must map each tensor name to a shard file name; re-download the model")
    files = [inside(folder, f, index) for f in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise bad_input(f"{index} names shard {os.path.relpath(missing[0], folder)!r}, which is missing; "
                        "re-download the model")
    return files


def weight_files(folder: str, *, pickles: bool = True) -> list[str]:
    """The weight files of a Hugging Face folder (pickles=False: safetensors only, as every quantized format is)."""
    for index_name, single in LAYOUTS if pickles else LAYOUTS[:1]:
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            return index_files(folder, index)
        if os.path.exists(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    wanted = "model.safetensors, a sharded index or pytorch_model.bin" if pickles else \
        "model.safetensors or model.safetensors.index.json"
    raise bad_input(f"{folder}: no {wanted} found; point at a model folder or a file")


class Folder:
    """A checkpoint on disk: a folder (weights, index, config.json, side files) or a single weights file."""

    def __init__(self, path: str, *, pickles: bool = True, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES):
        if not os.path.exists(path):
            raise missing_path_error(path)
        self.path = path
        self.is_folder = os.path.isdir(path)
        if self.is_folder:
            self.files = weight_files(path, pickles=pickles)
            self.config = read_json(os.path.join(path, "config.json"), what="an object of settings")
        else:
            if not path.endswith(suffixes):
                raise bad_input(f"{path}: expected a {' or '.join(s for s in suffixes)} file, or a model folder")
            self.files = [path]
            self.config = None

    def copy_side_files(self, dst_folder: str) -> None:
        if self.is_folder:
            copy_side_files(self.path, dst_folder)


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


class TensorFiles(Folder):
    """A safetensors checkpoint's tensors by key, whichever file holds them (the foreign readers' view)."""

    def __init__(self, path: str):
        super().__init__(path, pickles=False, suffixes=(".safetensors",))
        self.handles = {f: open_safetensors(f) for f in self.files}
        self.where: dict[str, str] = {}
        self.keys: list[str] = []
        for f, h in self.handles.items():
            for k in h.keys():
                if k in self.where:  # which copy is right is unknowable
                    raise bad_input(f"{path}: tensor {k!r} is in both {os.path.basename(self.where[k])} and "
                                    f"{os.path.basename(f)}; remove the stale shard or fix the index")
                self.where[k] = f
                self.keys.append(k)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise bad_input(f"{self.path}: tensor {key!r} is missing; the checkpoint is damaged")
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise bad_input(f"{self.where[key]}: cannot read tensor {key!r} ({short_error(e)})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        from kbitcli.io.dtypes import from_safetensors

        name = self.handles[self.where[key]].get_slice(key).get_dtype()
        dtype = from_safetensors(name)
        if dtype is None:
            raise bad_input(f"{self.where[key]}: tensor {key!r} is stored as {name}, which kbit does not read")
        return dtype

    def __contains__(self, key: str) -> bool:
        return key in self.where
