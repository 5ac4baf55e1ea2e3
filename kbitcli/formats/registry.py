"""Which format a path holds (detect), its reader (open_reader), and the writer of each output format (WRITERS).

detect() decides from config.json, file names and safetensors headers only (no tensor is read), and is the
one answer to "is this already quantized?" that encode, decode, inspect, bench and load_model all use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

from kbitcli.errors import bad_input
from kbitcli.formats import bnb, compressed_tensors, gguf_format, kbit_write
from kbitcli.formats.protocol import Reader
from kbitcli.io.folder import missing_path_error, open_safetensors, read_json, weight_files
from kbitcli.io.manifest import locate

def _quant_method(folder: str) -> str | None:
    qc = (read_json(os.path.join(folder, "config.json")) or {}).get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def _gguf_in(folder: str) -> str | None:
    """The one .gguf file of a folder holding no safetensors (llama.cpp's layout), else None."""
    names = os.listdir(folder)
    ggufs = sorted(f for f in names if f.endswith(".gguf"))
    if not ggufs or any(f.endswith(".safetensors") for f in names):
        return None
    if len(ggufs) > 1:
        raise bad_input(f"{folder} holds {len(ggufs)} .gguf files; point at one of them")
    return os.path.join(folder, ggufs[0])


def detect(path: str) -> str:
    """'kbit' | 'bnb' | 'compressed-tensors' | 'gguf' | 'dense'. Another tool's quantized layout that kbit
    does not read (GPTQ/AWQ `qweight`, another quant_method) is refused here, by name."""
    if not os.path.exists(path):
        raise missing_path_error(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(path):
        method = _quant_method(path)
        if method == "bitsandbytes":
            return "bnb"
        if method == "compressed-tensors":
            return "compressed-tensors"
        if _gguf_in(path):
            return "gguf"
        first = weight_files(path)[0]
    else:
        method, first = None, path
    if not first.endswith(".safetensors"):
        return _refuse_other(path, method, [])
    h = open_safetensors(first)
    if (h.metadata() or {}).get("format") == "kbit":
        return "kbit"
    keys = list(h.keys())
    if any(".quant_state.bitsandbytes__" in k or k.endswith(".SCB") for k in keys):
        return "bnb"
    if any(k.endswith(".weight_packed") for k in keys):
        raise bad_input(f"{path}: compressed-tensors weights need their config.json (the scheme is there); "
                        "point at the model folder")
    return _refuse_other(path, method, keys)


# tensor names only quantized checkpoints have: bitsandbytes parts, compressed-tensors' packed words, GPTQ/AWQ
QUANTIZED_KEYS = (".absmax", ".quant_map", ".weight_packed", ".qweight", ".qzeros", ".SCB")


def refuse_quantized_keys(path: str, keys) -> None:
    """A checkpoint whose tensor names show it is quantized, in a layout kbit could not recognise as a whole
    (a bare file of bnb parts without their quant_state, GPTQ's qweight...): refused, never read as dense."""
    hit = next((k for k in keys if k.endswith(QUANTIZED_KEYS) or ".quant_state." in k), None)
    if hit is not None:
        raise bad_input(f"{path} is already quantized (bitsandbytes / compressed-tensors / GPTQ keys such as "
                        f"{hit[-60:]!r}); give the original dense model, or `kbit decode` it to a dense checkpoint first")


def _refuse_other(path: str, method: str | None, keys: list[str]) -> str:
    if method not in (None, "kbit"):
        raise bad_input(f"{path}/config.json has a quantization_config ({method}), a format kbit does not read; "
                        "give the original dense model")
    refuse_quantized_keys(path, keys)
    return "dense"


def open_reader(path: str, fmt: str | None = None) -> Reader:
    """The reader for whatever path holds (formats/protocol.py); fmt: what detect(path) already said."""
    fmt = fmt or detect(path)
    if fmt == "kbit":
        from kbitcli.formats.kbit_format import KbitCheckpoint

        return KbitCheckpoint(path)
    if fmt == "bnb":
        from kbitcli.formats.bnb_reader import BnbCheckpoint

        return BnbCheckpoint(path)
    if fmt == "compressed-tensors":
        from kbitcli.formats.compressed_tensors_reader import CtCheckpoint

        return CtCheckpoint(path)
    if fmt == "gguf":
        from kbitcli.formats.gguf_reader import GgufCheckpoint

        return GgufCheckpoint(path if os.path.isfile(path) else _gguf_in(path))
    from kbitcli.formats.source import open_source

    return open_source(path)


def describe(reader: Reader) -> dict:
    """`kbit inspect` of any checkpoint: per tensor what the format stores, bits per parameter, sizes."""
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
        row.update(info.get("extra", {}))
        rows.append(row)
    # the weight files as written (safetensors headers, kbit metadata, shared tables included): the size
    # `kbit encode` reports for the same output, so both print the same whole-model bits/param
    size = sum(os.path.getsize(f) for f in reader.files)
    # params is 0 for a file with no tensors, or only empty ones: no bits per parameter
    return {"path": reader.path, "format": reader.format, "tensors": len(rows),
            "quantized_tensors": sum(r["quantized"] for r in rows), "params": params, "quantized_params": qparams,
            "bytes": size, "bits_per_param_quantized": round(qbytes * 8 / qparams, 4) if qparams else None,
            "bits_per_param_model": round(size * 8 / params, 4) if params else None,
            "files": [os.path.basename(f) for f in reader.files], "manifest": os.path.exists(locate(reader.path)[0]),
            "plan": rows}


# ---- writers ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Writer:
    """export(src, src_path, dst, plan, recipe, recipe_info, *, force, dry_run, progress, max_shard_bytes,
    calib, **options) -> the result dict; with calib, each format quantizes on its own grid during the
    calibration run. defaults: the recipe settings the format starts from (e.g. GGUF: int, B=32); a setting the user gives
    explicitly is never changed: a format that cannot hold it refuses it."""

    export: Callable[..., dict]
    defaults: dict = field(default_factory=dict)


WRITERS = {
    "kbit": Writer(kbit_write.export),
    "bnb": Writer(bnb.export, defaults=bnb.DEFAULTS),
    "compressed-tensors": Writer(compressed_tensors.export, defaults=compressed_tensors.DEFAULTS),
    "gguf": Writer(gguf_format.export, defaults=gguf_format.DEFAULTS),
}


def writer(fmt: str) -> Writer:
    if fmt not in WRITERS:
        raise bad_input(f"--format {fmt!r}: choose one of {', '.join(WRITERS)}")
    return WRITERS[fmt]
