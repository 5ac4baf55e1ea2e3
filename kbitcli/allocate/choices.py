"""What `kbit plan` may give each tensor (the choice grid) and what it may spend (the budget).

A choice is one recipe setting (bits, block size, data type, double quantization). Its cost for a tensor is
exact: the bits the tensor occupies on disk as encode writes it (core/blockwise.layout: codes, scales, double
quant's second-level scales), so a plan that fits the budget here fits it in the encoded file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kbitcli.core.blockwise import Spec, layout_bits, resolve_block
from kbitcli.errors import bad_input
from kbitcli.recipes import check_settings

# Why this grid (docs/PLAN.md): k 2..8 spans everything encode offers; blocks 32/64/128 are where scale
# overhead vs accuracy trades (16 costs 1 bit per value of fp16 scale, 256+ loses accuracy at low k); nf and int
# are the two types the frontier studies keep finding best (fp is between them); double quantization cuts the
# scale cost from 16 to ~8.03 bits per block for an error change too small to matter at any k.
DEFAULT_CHOICES = "bits=2..8 block=32,64,128 dtype=nf,int dq=true"
KEYS = {"bits": "bits", "k": "bits", "block": "block_size", "block_size": "block_size", "dtype": "dtype",
        "type": "dtype", "dq": "double_quant", "double_quant": "double_quant"}


@dataclass(frozen=True)
class Choice:
    bits: int
    block_size: int | str
    dtype: str
    double_quant: bool = True

    def settings(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "dtype": self.dtype, "double_quant": self.double_quant}

    def label(self) -> str:
        return f"{self.dtype}{self.bits} b{self.block_size}" + (" dq" if self.double_quant else "")

    def spec(self, shape: tuple[int, ...], scale_search: int = 1) -> Spec | None:
        """The Spec encode would use for a tensor of `shape`, or None when the block does not fit it."""
        values = resolve_block(self.block_size, shape)
        if values > math.prod(shape):
            return None
        return Spec(self.bits, values, self.dtype, self.double_quant, "fp16", scale_search, "rtn")

    def cost_bits(self, shape: tuple[int, ...]) -> int | None:
        spec = self.spec(shape)
        return None if spec is None else layout_bits(spec, math.prod(shape))


def _values(key: str, text: str, where: str) -> list:
    out = []
    for part in filter(None, text.split(",")):
        if key == "bits" and ".." in part:
            lo, _, hi = part.partition("..")
            try:
                out += list(range(int(lo), int(hi) + 1))
            except ValueError:
                raise bad_input(f"{where}: {part!r} is not a range of bits such as 2..8") from None
        elif key == "bits":
            try:
                out.append(int(part))
            except ValueError:
                raise bad_input(f"{where}: bits {part!r} is not an integer") from None
        elif key == "double_quant":
            if part.lower() not in ("true", "false", "1", "0", "on", "off"):
                raise bad_input(f"{where}: dq {part!r} must be true or false")
            out.append(part.lower() in ("true", "1", "on"))
        elif key == "block_size":
            out.append(int(part) if part.isdigit() else part)
        else:
            out.append(part)
    return out


def parse_choices(text: str) -> list[Choice]:
    """'bits=2..8 block=32,64,128 dtype=nf,int dq=true' -> every combination; a key left out takes its default
    from DEFAULT_CHOICES. Each value is checked as a recipe value is; no combination at all is an error."""
    where = f"--choices {text!r}"
    grid = {}
    for spec in (DEFAULT_CHOICES, text):
        given = {}
        for item in spec.split():
            key, sep, value = item.partition("=")
            if not sep or key not in KEYS:
                raise bad_input(f"{where}: {item!r} is not KEY=VALUES with KEY one of bits, block, dtype, dq "
                                f"(e.g. \"{DEFAULT_CHOICES}\")")
            given[KEYS[key]] = _values(KEYS[key], value, where)
        grid.update(given)
    if not all(grid.values()):
        empty = next(k for k, v in grid.items() if not v)
        raise bad_input(f"{where}: empty choice set ({empty} has no value); give at least one, e.g. \"{DEFAULT_CHOICES}\"")
    out = []
    for b in dict.fromkeys(grid["bits"]):
        for block in dict.fromkeys(grid["block_size"]):
            for dt in dict.fromkeys(grid["dtype"]):
                for dq in dict.fromkeys(grid["double_quant"]):
                    s = check_settings({"bits": b, "block_size": block, "dtype": dt, "double_quant": dq}, where)
                    if s["dtype"] == "quantile":
                        raise bad_input(f"{where}: dtype quantile stores a table per tensor; plan with nf, int, fp or dynamic")
                    out.append(Choice(s["bits"], s["block_size"], s["dtype"], s["double_quant"]))
    return out


@dataclass(frozen=True)
class Budget:
    kind: str  # "bits": bits per quantized parameter; "bytes": bytes of the whole output as encode writes it
    value: float
    text: str

    def describe(self) -> str:
        return f"{self.value:g} bits per quantized parameter" if self.kind == "bits" else f"{self.text} ({int(self.value):,} bytes)"


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_PLAIN_BITS = 32  # a plain number above this is a size without its unit, not bits per parameter


def parse_budget(text: str) -> Budget:
    """'3.5' -> 3.5 bits per quantized parameter; '60MB', '1.2GiB', '500KB' -> bytes of the output."""
    s = str(text).strip().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([A-Za-z]*)", s)
    if not m:
        raise bad_input(f"--budget {text!r}: expected bits per quantized parameter (e.g. 3.5) or a size with a unit "
                        "(e.g. 60MB, 1.2GiB)")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit in ("", "BITS", "BIT"):
        if value > MAX_PLAIN_BITS:
            raise bad_input(f"--budget {text!r}: a size needs a unit (e.g. {text}B, 60MB, 1.2GiB); a plain number "
                            "is bits per quantized parameter (e.g. 3.5)")
        if value <= 0:
            raise bad_input(f"--budget {text!r}: must be above 0 bits per parameter, e.g. 3.5")
        return Budget("bits", value, s)
    if unit not in SIZE_UNITS:
        raise bad_input(f"--budget {text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, KiB, MiB or GiB")
    return Budget("bytes", int(value * SIZE_UNITS[unit]), s)
