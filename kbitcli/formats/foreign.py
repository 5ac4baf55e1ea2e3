"""Reading checkpoints other engines wrote: bitsandbytes (transformers' 4-bit and 8-bit layouts),
compressed-tensors (vLLM / llm-compressor) and GGUF (llama.cpp).

`open_foreign(path)` recognises them from the files (bnb: config.json quantization_config.quant_method ==
"bitsandbytes" or `.quant_state.bitsandbytes__` keys; compressed-tensors: quant_method "compressed-tensors";
GGUF: a `.gguf` file, or a folder holding exactly one) and returns a reader with the interface of
KbitCheckpoint: `.path`, `.is_folder`, `.config`, `.names` (the original model's tensor names), `.shape(n)`,
`.orig_dtype(n)`, `.tensor(n, dtype)`, `.is_quantized(n)`, `.dense(n)`, plus `.format` and `.describe(n)` for
`kbit inspect`. Dequantization is kbit's own code, written from each format's layout (no bitsandbytes import);
the tests check it against each format's own package. Anything else returns None.
"""

from __future__ import annotations

import json
import os

import torch

from kbitcli.errors import KbitError, bad_input
from kbitcli.formats.safetensors_stream import TORCH_DTYPES
from kbitcli.formats.source import _short, index_files, open_safetensors

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Files:
    """The safetensors files of a folder (single file, or shards named by the index) or one file, keyed."""

    def __init__(self, path: str):
        self.path = path
        self.is_folder = os.path.isdir(path)
        self.config = None
        if self.is_folder:
            self.config = read_json(os.path.join(path, "config.json"))
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                self.files = index_files(path, index)  # each shard inside the folder, present
            elif os.path.exists(os.path.join(path, "model.safetensors")):
                self.files = [os.path.join(path, "model.safetensors")]
            else:
                raise bad_input(f"{path}: no model.safetensors or model.safetensors.index.json")
        else:
            self.files = [path]
        self.handles = {f: open_safetensors(f) for f in self.files}
        self.where: dict[str, str] = {}
        self.keys: list[str] = []
        for f, h in self.handles.items():
            for k in h.keys():
                self.where.setdefault(k, f)
                self.keys.append(k)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise bad_input(f"{self.path}: tensor {key!r} is missing; the checkpoint is damaged")
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise bad_input(f"{self.where[key]}: cannot read tensor {key!r} ({_short(e)})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return TORCH_DTYPES[self.handles[self.where[key]].get_slice(key).get_dtype()]

    def __contains__(self, key: str) -> bool:
        return key in self.where


def read_json(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as e:
        raise bad_input(f"{path}: not valid JSON ({_short(e)})") from None


def quant_method(path: str) -> str | None:
    cfg = read_json(os.path.join(path, "config.json")) if os.path.isdir(path) else None
    qc = (cfg or {}).get("quantization_config") or {}
    return qc.get("quant_method")


def open_foreign(path: str):
    """A reader for a bitsandbytes / compressed-tensors / GGUF checkpoint at path, or None if it is none of them."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        from kbitcli.formats.gguf_reader import GgufCheckpoint

        return GgufCheckpoint(path)
    if os.path.isdir(path):
        method = quant_method(path)
        if method == "bitsandbytes":
            from kbitcli.formats.bnb import BnbCheckpoint

            return BnbCheckpoint(path)
        if method == "compressed-tensors":
            from kbitcli.formats.compressed_tensors import CtCheckpoint

            return CtCheckpoint(path)
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        has_st = any(f.endswith(".safetensors") for f in os.listdir(path))
        if len(ggufs) == 1 and not has_st:
            from kbitcli.formats.gguf_reader import GgufCheckpoint

            return GgufCheckpoint(os.path.join(path, ggufs[0]))
        if len(ggufs) > 1 and not has_st:
            raise bad_input(f"{path} holds {len(ggufs)} .gguf files; point at one of them")
        return None
    if os.path.isfile(path) and path.endswith(".safetensors"):
        keys = list(open_safetensors(path).keys())
        if any(".quant_state.bitsandbytes__" in k or k.endswith(".SCB") for k in keys):
            from kbitcli.formats.bnb import BnbCheckpoint

            return BnbCheckpoint(path)
        if any(k.endswith(".weight_packed") for k in keys):
            raise bad_input(f"{path}: compressed-tensors weights need their config.json (the scheme is there); "
                            "point at the model folder")
    return None


def describe(reader) -> dict:
    """`kbit inspect` of a foreign checkpoint: per tensor what the format stores, bits per parameter, sizes."""
    import math

    rows, params, qparams, qbytes = [], 0, 0, 0
    for n in reader.names:
        shape = reader.shape(n)
        numel = math.prod(shape)
        params += numel
        info = reader.describe(n)
        row = {"name": n, "shape": list(shape), "quantized": reader.is_quantized(n), "bytes": info["bytes"],
               "bits_per_param": round(info["bytes"] * 8 / max(numel, 1), 4)}
        if row["quantized"]:
            qparams += numel
            qbytes += info["bytes"]
            row.update(bits=info.get("bits"), block_size=info.get("block_size"), data_type=info["data_type"],
                       double_quant=info.get("double_quant", False),
                       orig_dtype=str(reader.orig_dtype(n)).removeprefix("torch."))
        else:
            row["dtype"] = info["data_type"]
        rows.append(row)
    files = reader.files
    size = sum(os.path.getsize(f) for f in files)
    return {"path": reader.path, "format": reader.format, "tensors": len(rows),
            "quantized_tensors": sum(r["quantized"] for r in rows), "params": params, "quantized_params": qparams,
            "bytes": size, "bits_per_param_quantized": round(qbytes * 8 / qparams, 4) if qparams else None,
            "bits_per_param_model": round(size * 8 / params, 4) if params else None,
            "files": [os.path.basename(f) for f in files], "manifest": os.path.exists(manifest_path(reader)),
            "plan": rows}


def manifest_path(reader) -> str:
    """Where kbit puts the manifest of an export: in the folder, or beside a single file."""
    if os.path.isdir(reader.path):
        return os.path.join(reader.path, "kbit_manifest.json")
    return reader.path + ".manifest.json"


def verify(reader) -> dict:
    """Re-hash the files against the manifest kbit wrote beside them (kbit exports only)."""
    from kbitcli.formats.output import checkpoint_files, verify_records
    from kbitcli.formats.source import inside

    folder = os.path.isdir(reader.path)
    man_path = manifest_path(reader)
    if not os.path.exists(man_path):
        raise bad_input(f"{reader.path}: no kbit manifest ({os.path.basename(man_path)}); --verify checks files "
                        "kbit wrote (other tools' checkpoints carry no manifest)")
    try:
        man = read_json(man_path)
    except KbitError:
        man = None
    man = man if isinstance(man, dict) else {"outputs": None}  # damaged: verify_records says so
    root = reader.path if folder else os.path.dirname(os.path.abspath(reader.path))
    # every file of the checkpoint must be listed: a manifest that leaves one out vouches for nothing
    required = checkpoint_files(root, reader.files) if folder else [reader.path]
    return verify_records(reader.path, man.get("outputs", []),
                          lambda rec: inside(root, rec["name"], os.path.basename(man_path)), required)


def load_dense(path: str, dtype: torch.dtype | None = None):
    """(transformers model in eval mode, tokenizer or None) for a bnb / compressed-tensors / GGUF checkpoint, its
    weights dequantized by kbit's readers: what `kbit bench` and `kbit generate` can run for any of them without
    bitsandbytes, compressed-tensors or llama.cpp. None if path is none of those formats."""
    reader = open_foreign(path)
    if reader is None:
        return None
    from transformers import AutoConfig, AutoTokenizer
    from transformers import initialization as hf_init

    from kbitcli.models.load import model_class, params_on_meta

    raw = {k: v for k, v in (reader.config or {}).items() if k != "quantization_config"}
    if "model_type" not in raw:
        raise bad_input(f"{path}: no config.json with a model_type; cannot build the model")
    config = AutoConfig.for_model(**raw)
    with params_on_meta(), hf_init.no_init_weights():  # parameters cost nothing until assigned; buffers stay real
        model = model_class(config)._from_config(config)
    keys = set(model.state_dict())
    state = {}
    for n in reader.names:
        if n in keys:
            state[n] = reader.tensor(n, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if meta:
        raise bad_input(f"{path}: the checkpoint has no tensor for {meta[0]!r} ({len(meta)} missing)")
    if dtype is not None:
        model.to(dtype)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if reader.format == "gguf":
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(reader.path)) \
            if reader.meta.get("tokenizer.ggml.tokens") else None
    else:
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
        has = any(os.path.exists(os.path.join(folder, f)) for f in names)
        tok = AutoTokenizer.from_pretrained(folder) if has else None
    return model.eval(), tok
