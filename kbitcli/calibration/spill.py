"""Calibrated tensors wait on disk, not in memory, until the encoder streams them into the output in plan
order (calibration runs block by block; the output is written in the source's tensor order)."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kbitcli.core.blockwise import QuantizedTensor

PARTS = ("codes", "scales", "codebook", "scales_absmax", "scales_offset")


class Spill:
    """put(name, QuantizedTensor) writes one small safetensors file; get(name) reads it back."""

    def __init__(self, parent: str | None = None):
        self.dir = tempfile.mkdtemp(prefix=".kbit-calib-", dir=parent)
        self.files: dict[str, tuple[str, QuantizedTensor]] = {}

    def put(self, name: str, qt: QuantizedTensor) -> None:
        path = os.path.join(self.dir, f"{len(self.files):06d}.safetensors")
        save_file({p: getattr(qt, p).contiguous() for p in PARTS if getattr(qt, p) is not None}, path)
        # keep the small description (spec, shape, dtype) in memory; the tensors stay on disk
        self.files[name] = (path, QuantizedTensor(qt.spec, qt.shape, qt.orig_dtype, None, None, None))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> QuantizedTensor:
        path, desc = self.files[name]
        with safe_open(path, "pt") as fh:
            parts = {k: fh.get_tensor(k) for k in fh.keys()}
        return QuantizedTensor(desc.spec, desc.shape, desc.orig_dtype, parts["codes"], parts["scales"], parts["codebook"],
                               parts.get("scales_absmax"), parts.get("scales_offset"))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
