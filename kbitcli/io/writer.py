"""The one folder writer: shards, index, config.json, side files and manifest, all-or-nothing.

Every output (encode in any format, decode, merge) is written through it:

    with FolderWriter(dst, folder=True, force=force) as out:
        for fname, entries, metadata in shards:          # entries: (key, dtype, shape), planned up front
            with out.shard(fname, entries, metadata) as f:
                f.put(key, tensor) ...                   # streamed: one tensor in memory at a time
        out.finish(config=..., side_files=source_folder, manifest=manifest.build(...))

Everything goes to AtomicOutput's temporary name and is renamed over DST at the end, so an error, Ctrl-C or
SIGTERM leaves DST as it was. A single-file output (`folder=False`) is one shard and a sidecar manifest.
"""

from __future__ import annotations

import contextlib
import json
import os

from kbitcli.io import manifest as manifests
from kbitcli.io.atomic import AtomicOutput
from kbitcli.io.folder import INDEX, copy_side_files
from kbitcli.io.safetensors_stream import PlannedFile, nbytes


class PlannedTensor:
    """One dense output tensor for shard planning (plan.assign_shards): its name, dtype, shape and bytes."""

    def __init__(self, name: str, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)

    def out_bytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def shard_names(count: int, stem: str = "model") -> list[str]:
    """Hugging Face's names: model.safetensors, or model-00001-of-00003.safetensors ..."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class FolderWriter:
    def __init__(self, dst: str, *, folder: bool, force: bool):
        self.dst, self.folder = dst, folder
        self._atomic = AtomicOutput(dst, folder=folder, force=force)
        self.weight_map: dict[str, str] = {}
        self.paths: list[str] = []  # the shard files written so far (under the temporary name)
        self.tensor_bytes = 0
        self.records: list[dict] = []

    def __enter__(self):
        self._atomic.__enter__()
        self.root = self._atomic.tmp
        return self

    def __exit__(self, *exc):
        return self._atomic.__exit__(*exc)

    @contextlib.contextmanager
    def shard(self, fname: str, entries, metadata: dict[str, str] | None = None, shared: tuple[str, ...] = ()):
        """A PlannedFile for one shard; closed (header checked complete) on leaving, removed on an error.
        `shared`: keys every shard holds a copy of (the native format's codebook tables), left out of the index."""
        if not self.folder and self.paths:
            raise ValueError("a single-file output has one shard")
        path = os.path.join(self.root, fname) if self.folder else self.root
        pf = PlannedFile(path, entries, metadata or {"format": "pt"})
        try:
            yield pf
            pf.close()
        finally:
            pf.abort()
        for key, dtype, shape in entries:
            if key in shared:
                continue
            self.weight_map[key] = fname
            self.tensor_bytes += nbytes(dtype, shape)
        self.paths.append(path)

    def finish(self, *, config: dict | None = None, side_files: str | None = None, write_side_files=None,
               index_metadata: dict | None = None, manifest: dict | None = None) -> list[dict]:
        """Write the index (several shards), side files (copied from the folder `side_files`, or made by
        write_side_files(folder)), config.json and the manifest. Returns the manifest's file records."""
        if self.folder:
            if len(self.paths) > 1:
                index = {"metadata": {"total_size": self.tensor_bytes, **(index_metadata or {})},
                         "weight_map": self.weight_map}
                with open(os.path.join(self.root, INDEX), "w") as fh:
                    json.dump(index, fh, indent=2)
            if write_side_files is not None:
                write_side_files(self.root)
            elif side_files is not None:
                copy_side_files(side_files, self.root)
            if config is not None:
                with open(os.path.join(self.root, "config.json"), "w") as fh:
                    json.dump(config, fh, indent=2)
        if manifest is not None:
            sidecar = None if self.folder else self._atomic.sidecar(self.dst + manifests.SIDECAR)
            self.records = manifests.write(manifest, self.root, self.dst, sidecar)
        return self.records
