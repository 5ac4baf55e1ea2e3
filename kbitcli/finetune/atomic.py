"""One file at a time, all or nothing: write beside the target under a temporary name, fsync, rename.

A training run's folder fills up over hours (checkpoints, log, adapter), so it cannot be one
AtomicOutput; instead every file in it is replaced atomically, and a crash or Ctrl-C leaves each file
either as it was or complete.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str):
    """with atomic_path(p) as tmp: write tmp; it becomes p only if the block finishes."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.kbit-tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
