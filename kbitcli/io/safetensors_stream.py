"""Write a safetensors file tensor by tensor, from a header planned up front.

safetensors' own `save_file` needs every tensor of a file in memory at once; a 5 GB shard would then cost
5 GB of RAM. Because the planner knows every output tensor's dtype and shape before any work is done
(blockwise.layout), we write the standard header first and then stream each tensor's bytes straight to its
offset. Peak memory is one tensor, whatever the model size. Files are read back with safetensors itself.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
(padded with spaces to a multiple of 8), then the tensors' bytes, contiguous, in data_offsets order.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

from kbitcli.io.dtypes import safetensors_name



def nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * dtype.itemsize


def planned_header(entries, metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The padded JSON header of a file holding `entries` (ordered (name, dtype, shape)), and its data bytes."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": safetensors_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), offset


def planned_file_size(entries, metadata: dict[str, str] | None = None) -> int:
    """Exact size on disk of the file PlannedFile(path, entries, metadata) writes (known before writing)."""
    raw, data = planned_header(entries, metadata)
    return 8 + len(raw) + data


class PlannedFile:
    """entries: ordered (name, dtype, shape). put() each tensor once (any order); close() checks all came."""

    def __init__(self, path: str, entries, metadata: dict[str, str] | None = None):
        self.path = path
        self.expected: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        raw, offset = planned_header(entries, metadata)
        start = 0
        for name, dtype, shape in entries:
            self.expected[name] = (dtype, tuple(shape), start)
            start += nbytes(dtype, shape)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.written: set[str] = set()
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.fh.truncate(self.size)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape, offset = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        if name in self.written:
            raise AssertionError(f"{name} written twice")
        self.fh.seek(self.data_start + offset)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.fh.write(memoryview(data))
        self.written.add(name)

    def close(self) -> None:
        missing = set(self.expected) - self.written
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if missing:
            raise AssertionError(f"{self.path}: never written: {sorted(missing)[:5]}")

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
