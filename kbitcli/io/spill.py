"""Calibrated tensors wait on disk, not in memory, until the encoder streams them into the output in plan
order (calibration runs block by block; the output is written in the source's tensor order)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from kbitcli.core.blockwise import QuantizedTensor

def spill_dir(dst: str | None) -> str:
    """A fresh folder beside DST named like DST's own temporary output (`.DST.kbit-tmp-PID.calib`), so a run
    killed mid-way leaves something the next run's stale-temp sweep recognises and removes; without a DST, a
    plain temporary folder."""
    if dst is None:
        return tempfile.mkdtemp(prefix="kbit-calib-")
    parent, base = os.path.split(os.path.abspath(dst))
    path = os.path.join(parent, f".{base}.kbit-tmp-{os.getpid()}.calib")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


PARTS = ("codes", "scales", "codebook", "scales_absmax", "scales_offset")


class PartsSpill:
    """put(name, {part: tensor}) writes one small safetensors file (None parts left out); get(name) reads the
    dict back. Any format's calibrated tensors wait here until the writer streams them."""

    def __init__(self, dst: str | None = None):
        self.dir = spill_dir(dst)
        self.files: dict[str, str] = {}

    def put(self, name: str, parts: dict) -> None:
        path = os.path.join(self.dir, f"{len(self.files):06d}.safetensors")
        save_file({k: v.contiguous() for k, v in parts.items() if v is not None}, path)
        self.files[name] = path

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> dict:
        with safe_open(self.files[name], "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Spill(PartsSpill):
    """The native format's spill: put(name, QuantizedTensor), get(name) -> QuantizedTensor."""

    def __init__(self, dst: str | None = None):
        super().__init__(dst)
        self.desc: dict[str, QuantizedTensor] = {}

    def put(self, name: str, qt: QuantizedTensor) -> None:
        super().put(name, {p: getattr(qt, p) for p in PARTS})
        # keep the small description (spec, shape, dtype) in memory; the tensors stay on disk
        self.desc[name] = QuantizedTensor(qt.spec, qt.shape, qt.orig_dtype, None, None, None)

    def get(self, name: str) -> QuantizedTensor:
        d, parts = self.desc[name], super().get(name)
        return QuantizedTensor(d.spec, d.shape, d.orig_dtype, parts["codes"], parts["scales"], parts["codebook"],
                               parts.get("scales_absmax"), parts.get("scales_offset"))


def spill_for(calib, dst: str, kind=PartsSpill):
    """A spill of `kind` beside dst when calibrating, else a null context (yields None)."""
    return contextlib.nullcontext() if calib is None else kind(dst)
