"""The one dtype table: each tensor dtype kbit reads or writes, by every name it goes by.

    torch            safetensors header   config.json / metadata   CLI (--torch-dtype, scale_dtype)
Floating types are what models are stored in; the integer ones are what k-bit parts (codes, double-quant
scale codes, packed int32 words) and dense buffers (position ids, masks) are stored in. A dtype missing here
(fp8, unsigned 16/32/64-bit) is one kbit does not read: readers refuse it by name instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kbitcli.errors import bad_input


@dataclass(frozen=True)
class DType:
    torch: torch.dtype
    safetensors: str  # the header's "dtype" string (also GGUF's name of its dense types F32/F16/BF16)
    config: str  # torch's name without "torch.", as config.json's `dtype` / `torch_dtype` and kbit's metadata write it
    cli: str | None = None  # the short name flags and recipes take


TABLE = (
    DType(torch.float64, "F64", "float64"),
    DType(torch.float32, "F32", "float32", "fp32"),
    DType(torch.float16, "F16", "float16", "fp16"),
    DType(torch.bfloat16, "BF16", "bfloat16", "bf16"),
    DType(torch.int64, "I64", "int64"),
    DType(torch.int32, "I32", "int32"),
    DType(torch.int16, "I16", "int16"),
    DType(torch.int8, "I8", "int8"),
    DType(torch.uint8, "U8", "uint8"),
    DType(torch.bool, "BOOL", "bool"),
)
_BY_TORCH = {d.torch: d for d in TABLE}
_BY_ST = {d.safetensors: d for d in TABLE}
_BY_NAME = {**{d.config: d for d in TABLE}, **{d.cli: d for d in TABLE if d.cli}}
FLOAT_NAMES = tuple(d.cli for d in TABLE if d.cli)  # fp32, fp16, bf16: what a dense model may be computed in


def safetensors_name(dtype: torch.dtype) -> str | None:
    d = _BY_TORCH.get(dtype)
    return d.safetensors if d else None


def from_safetensors(name: str) -> torch.dtype | None:
    d = _BY_ST.get(name)
    return d.torch if d else None


def config_name(dtype: torch.dtype) -> str:
    return _BY_TORCH[dtype].config


def from_name(name) -> torch.dtype | None:
    """A config / metadata / CLI name (float16, fp16, ...) -> torch dtype; None if unknown."""
    d = _BY_NAME.get(name) if isinstance(name, str) else None
    return d.torch if d else None


def parse_float(name, flag: str = "--torch-dtype") -> torch.dtype | None:
    """A user's choice of floating dtype (fp32 | fp16 | bf16, or their torch names); None for 'auto' /
    'original' / unset (keep each tensor's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name in ("", "auto", "original"):
        return None
    d = _BY_NAME.get(name) if isinstance(name, str) else None
    if d is None or d.cli is None:
        raise bad_input(f"{flag} {name!r}: choose one of {', '.join(FLOAT_NAMES)} (or 'original')")
    return d.torch
