"""inspect: what a checkpoint holds. For a quantized one (native, bnb, compressed-tensors, GGUF): the per-tensor
plan, bits per parameter and sizes, and with verify=True a re-hash of every file against kbit's manifest. For a
dense one: the names, shapes and dtypes, and which tensors `encode` would quantize by default."""

from __future__ import annotations

import math

from kbitcli.errors import bad_input
from kbitcli.formats.registry import describe, open_reader
from kbitcli.io import manifest
from kbitcli.io.safetensors_stream import nbytes
from kbitcli.recipes import is_default_target


def inspect(path: str, verify: bool = False) -> dict:
    reader = open_reader(path)
    if reader.format == "dense":
        if verify:
            raise bad_input(f"{path} is not a kbit checkpoint; --verify checks kbit checkpoints against their manifest")
        return _inspect_dense(reader)
    out = describe(reader)
    if verify:
        out["verify"] = manifest.verify(reader.path, reader.files)
    return out


def _inspect_dense(src) -> dict:
    path = src.path
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
