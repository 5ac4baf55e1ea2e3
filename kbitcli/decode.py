"""decode: any checkpoint kbit reads (native, bitsandbytes, compressed-tensors, GGUF) -> a standard dense
safetensors checkpoint (same names and shapes), through the reader protocol (formats/protocol.py)."""

from __future__ import annotations

import contextlib
import time

from kbitcli.errors import bad_input
from kbitcli.formats.registry import open_reader
from kbitcli.io.atomic import check_destination, check_not_overlapping
from kbitcli.io.dtypes import parse_float
from kbitcli.io.writer import FolderWriter, PlannedTensor, shard_names
from kbitcli.parallel import default_workers, ordered_map, single_threaded_torch
from kbitcli.plan import assign_shards, parse_size
from kbitcli.progress import NullProgress

PARALLEL_MIN_BYTES = 256 << 10  # mean output bytes per tensor below which decode runs on one thread


def decode(src: str, dst: str, dtype: str | None = None, *, force: bool = False, max_shard_size: str = "5GB",
           progress=None) -> dict:
    t0 = time.time()
    progress = progress or NullProgress()
    ck = open_reader(src)
    if ck.format == "dense":
        raise bad_input(f"{src}: not a kbit checkpoint (no 'format: kbit' metadata), nor a bnb / compressed-tensors "
                        "/ GGUF one: it is already dense; encode it with `kbit encode`")
    want = parse_float(dtype, "--torch-dtype")
    check_not_overlapping(dst, [src])
    check_destination(dst, force, folder=ck.is_folder)
    entries = []
    for n in ck.names:
        od = ck.orig_dtype(n)
        entries.append(PlannedTensor(n, want if (want is not None and od.is_floating_point) else od, ck.shape(n)))
    limit = parse_size(max_shard_size)
    shards = assign_shards(entries, limit if ck.is_folder else None)  # a file gives one file, never shards
    folder = ck.is_folder
    names = shard_names(len(shards))
    total = sum(e.out_bytes() for e in entries)
    with FolderWriter(dst, folder=folder, force=force) as out:
        progress.start("decode", total, len(entries))
        for shard, fname in zip(shards, names):
            with out.shard(fname, [(e.name, e.dtype, e.shape) for e in shard]) as pf:
                # native checkpoints: a few tensors at once, one thread each (see kbitcli/parallel.py) -- unless
                # they are small: a thread handoff per 64x64 tensor cost more than it saved (20,000 of them
                # decoded in 4.2 s on two threads, 2.3 s on one)
                parallel = ck.format == "kbit" and total >= PARALLEL_MIN_BYTES * len(entries)
                with single_threaded_torch() if parallel else contextlib.nullcontext():
                    dense = lambda e: ck.tensor(e.name, e.dtype).reshape(e.shape).to(e.dtype)  # noqa: E731
                    for e, tensor in ordered_map(dense, shard, default_workers() if parallel else 1):
                        pf.put(e.name, tensor)
                        progress.advance(e.name, e.out_bytes())
        progress.stop()
        config = None
        if folder and ck.config is not None:
            config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
            if want is not None:
                config["torch_dtype"] = str(want).removeprefix("torch.")
        out.finish(config=config, write_side_files=ck.write_side_files if folder else None)
    return {"source": src, "destination": dst, "tensors": len(entries), "bytes_out": total,
            "dtype": dtype or "original", "seconds": round(time.time() - t0, 3)}
