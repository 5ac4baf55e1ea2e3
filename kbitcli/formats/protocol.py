"""The reader protocol: what every checkpoint reader gives, whatever the format on disk.

The native format (formats/kbit_format.py), bitsandbytes (formats/bnb.py), compressed-tensors
(formats/compressed_tensors.py), GGUF (formats/gguf_reader.py) and dense checkpoints (formats/source.py)
implement it, so `decode`, `inspect`, `bench` and `load_model` never ask which format they hold.
A reader validates what it reads against its metadata on every read (sizes, shapes, finite scales): damage
is exit 1 naming the tensor, never a garbage tensor.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Reader(Protocol):
    format: str  # "kbit" | "bnb" | "compressed-tensors" | "gguf" | "dense"
    path: str
    is_folder: bool  # decodes to a folder (weights + config.json + side files), else to one file
    config: dict | None  # config.json as transformers reads it (quantization_config included, if any)
    files: list[str]  # the weight files read (what a manifest must list)
    names: list[str]  # the original model's tensor names, in order

    def shape(self, name: str) -> tuple[int, ...]: ...

    def orig_dtype(self, name: str) -> torch.dtype: ...

    def is_quantized(self, name: str) -> bool: ...

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (dequantized) tensor, in `dtype` or its original dtype."""

    def describe(self, name: str) -> dict:
        """For `kbit inspect`: {"bytes", "data_type"[, "bits", "block_size", "double_quant"]}."""

    def write_side_files(self, folder: str) -> None:
        """Put the non-weight files a decoded folder needs (tokenizer, generation config...) into folder."""
