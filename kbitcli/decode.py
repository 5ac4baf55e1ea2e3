"""decode: k-bit checkpoint -> standard dense safetensors checkpoint (same names and shapes)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import KbitCheckpoint, shard_names
from kbitcli.formats.output import AtomicOutput, check_destination, check_not_overlapping
from kbitcli.formats.safetensors_stream import PlannedFile, nbytes
from kbitcli.formats.source import copy_side_files
from kbitcli.parallel import default_workers, ordered_map, single_threaded_torch
from kbitcli.plan import assign_shards, parse_size
from kbitcli.progress import NullProgress

OUT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class _Entry:
    """Shard planning for decode: a name with the bytes it will take."""

    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, shape

    def out_bytes(self):
        return nbytes(self.dtype, self.shape)


def out_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "original", "auto"):
        return None
    if name not in OUT_DTYPES:
        raise bad_input(f"--dtype {name!r}: choose one of fp32, fp16, bf16 (or 'original')")
    return OUT_DTYPES[name]


def open_checkpoint(path: str):
    """A kbit checkpoint, or (issue 5) a bitsandbytes / compressed-tensors / GGUF one: anything with
    .names, .shape(n), .orig_dtype(n), .tensor(n, dtype), .config."""
    if not os.path.exists(path):
        raise bad_input(f"{path}: no such file or folder")
    from kbitcli.formats import foreign

    reader = foreign.open_foreign(path)
    return reader if reader is not None else KbitCheckpoint(path)


def decode(src: str, dst: str, dtype: str | None = None, *, force: bool = False, max_shard_size: str = "5GB",
           progress=None) -> dict:
    t0 = time.time()
    progress = progress or NullProgress()
    ck = open_checkpoint(src)
    want = out_dtype(dtype)
    check_not_overlapping(dst, [src])
    check_destination(dst, force, folder=ck.is_folder)
    entries = []
    for n in ck.names:
        od = ck.orig_dtype(n)
        entries.append(_Entry(n, want if (want is not None and od.is_floating_point) else od, ck.shape(n)))
    limit = parse_size(max_shard_size)
    shards = assign_shards(entries, limit if ck.is_folder else None)  # a file gives one file, never shards
    folder = ck.is_folder
    names = shard_names(len(shards))
    total = sum(e.out_bytes() for e in entries)
    with AtomicOutput(dst, folder=folder, force=force) as out:
        progress.start("decode", total, len(entries))
        for shard, fname in zip(shards, names):
            path = os.path.join(out.tmp, fname) if folder else out.tmp
            pf = PlannedFile(path, [(e.name, e.dtype, e.shape) for e in shard], {"format": "pt"})
            try:
                # native checkpoints: a few tensors at once, one thread each (see kbitcli/parallel.py)
                parallel = isinstance(ck, KbitCheckpoint)
                with single_threaded_torch() if parallel else contextlib.nullcontext():
                    dense = lambda e: ck.tensor(e.name, e.dtype).reshape(e.shape).to(e.dtype)  # noqa: E731
                    for e, tensor in ordered_map(dense, shard, default_workers() if parallel else 1):
                        pf.put(e.name, tensor)
                        progress.advance(e.name, e.out_bytes())
                pf.close()
            finally:
                pf.abort()
        progress.stop()
        if folder:
            if len(names) > 1:
                wm = {e.name: f for shard, f in zip(shards, names) for e in shard}
                with open(os.path.join(out.tmp, "model.safetensors.index.json"), "w") as fh:
                    json.dump({"metadata": {"total_size": total}, "weight_map": wm}, fh, indent=2)
            if hasattr(ck, "write_side_files"):  # a GGUF file: the tokenizer is rebuilt from its metadata
                ck.write_side_files(out.tmp)
            else:
                copy_side_files(ck.path, out.tmp)
            if ck.config is not None:
                cfg = {k: v for k, v in ck.config.items() if k != "quantization_config"}
                if want is not None:
                    cfg["torch_dtype"] = str(want).removeprefix("torch.")
                with open(os.path.join(out.tmp, "config.json"), "w") as fh:
                    json.dump(cfg, fh, indent=2)
    return {"source": src, "destination": dst, "tensors": len(entries), "bytes_out": total,
            "dtype": dtype or "original", "seconds": round(time.time() - t0, 3)}
