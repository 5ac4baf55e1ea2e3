"""inspect: what a checkpoint holds. For a kbit checkpoint: the per-tensor plan, bits per parameter and
sizes, and with verify=True a re-hash of every file against the manifest. For a dense one: the names,
shapes and dtypes, and which tensors `encode` would quantize by default."""

from __future__ import annotations

import math
import os

from kbitcli.core.blockwise import Spec, layout_bits
from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import MANIFEST, KbitCheckpoint, looks_kbit
from kbitcli.formats.output import checkpoint_files, verify_records
from kbitcli.formats.safetensors_stream import nbytes
from kbitcli.formats.source import inside, open_source
from kbitcli.recipes import is_default_target


def inspect(path: str, verify: bool = False) -> dict:
    if not os.path.exists(path):
        raise bad_input(f"{path}: no such file or folder")
    from kbitcli.formats import foreign

    reader = foreign.open_foreign(path)  # bitsandbytes / compressed-tensors / GGUF (issue 5)
    if reader is not None:
        out = foreign.describe(reader)
        if verify:
            out["verify"] = foreign.verify(reader)
        return out
    if not looks_kbit(path):
        if verify:
            raise bad_input(f"{path} is not a kbit checkpoint; --verify checks kbit checkpoints against their manifest")
        return _inspect_dense(path)
    ck = KbitCheckpoint(path)
    rows = []
    params = qparams = qbits = 0
    for n in ck.names:
        shape = ck.shape(n)
        numel = math.prod(shape)
        params += numel
        m = ck.meta[n]
        if m is None:
            dt = ck.orig_dtype(n)
            rows.append({"name": n, "shape": list(shape), "quantized": False, "dtype": str(dt).removeprefix("torch."),
                         "bytes": nbytes(dt, shape), "bits_per_param": dt.itemsize * 8})
            continue
        bits = layout_bits(Spec(m["bits"], m["block_size"], m["dtype"], m["double_quant"], m["scale_dtype"]), numel)
        qparams += numel
        qbits += bits
        rows.append({"name": n, "shape": list(shape), "quantized": True, "bits": m["bits"], "block_size": m["block_size"],
                     "data_type": m["dtype"], "double_quant": m["double_quant"], "orig_dtype": m["orig_dtype"],
                     "bytes": bits // 8, "bits_per_param": round(bits / numel, 4)})
    files = ck.files
    size = sum(os.path.getsize(f) for f in files)
    # params is 0 for a file with no tensors, or only empty ones: no bits per parameter (was a ZeroDivisionError)
    out = {"path": path, "format": "kbit", "tensors": len(rows), "quantized_tensors": sum(r["quantized"] for r in rows),
           "params": params, "quantized_params": qparams, "bytes": size,
           "bits_per_param_quantized": round(qbits / qparams, 4) if qparams else None,
           "bits_per_param_model": round(size * 8 / params, 4) if params else None, "files": [os.path.basename(f) for f in files],
           "manifest": bool(ck.manifest) or os.path.exists(path + ".manifest.json"), "plan": rows}
    if verify:
        out["verify"] = verify_manifest(path, ck)
    return out


def _manifest_for(path: str, ck: KbitCheckpoint) -> tuple[dict, str]:
    if ck.is_folder:
        if ck.manifest is None:
            raise bad_input(f"{path}: no {MANIFEST}; cannot verify (re-encode with kbit to get one)")
        return ck.manifest, path
    side = path + ".manifest.json"
    if not os.path.exists(side):
        raise bad_input(f"{side} not found; cannot verify a single file without its manifest")
    import json

    try:
        with open(side) as fh:
            return json.load(fh), os.path.dirname(os.path.abspath(path))
    except (OSError, ValueError, RecursionError):  # RecursionError: valid JSON nested too deep for Python
        return None, os.path.dirname(os.path.abspath(path))  # damaged: verify_manifest reports it


def verify_manifest(path: str, ck: KbitCheckpoint) -> dict:
    manifest, root = _manifest_for(path, ck)
    if not isinstance(manifest, dict):
        manifest = {"outputs": None}  # damaged: verify_records says so
    # every file of the checkpoint must be listed: a manifest that leaves one out vouches for nothing
    required = checkpoint_files(root, ck.files) if ck.is_folder else [path]
    return verify_records(path, manifest.get("outputs", []),
                          lambda rec: inside(root, rec["name"], MANIFEST) if ck.is_folder else path, required)


def _inspect_dense(path: str) -> dict:
    src = open_source(path)
    rows = []
    for n in src.names:
        dt, shape = src.info(n)
        rows.append({"name": n, "shape": list(shape), "dtype": str(dt).removeprefix("torch."), "quantized": False,
                     "default_target": is_default_target(n, shape, dt.is_floating_point),
                     "bytes": nbytes(dt, shape), "bits_per_param": dt.itemsize * 8})
    params = sum(math.prod(r["shape"]) for r in rows)
    return {"path": path, "format": "dense", "tensors": len(rows), "params": params,
            "bytes": sum(r["bytes"] for r in rows), "default_targets": sum(r["default_target"] for r in rows),
            "plan": rows}
