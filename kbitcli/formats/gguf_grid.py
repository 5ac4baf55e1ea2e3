"""GGUF's legacy block types as kbit grids (core/grid.py), and the packer that writes GPTQ / weighted-RTN codes
as the exact GGUF block bytes, so a calibrated GGUF export decodes (gguf.quants.dequantize, llama.cpp) to the
very values the calibration forward used.

Per type (32 values per block, ggml's block layout as gguf-py's quants.py reads it):
    Q4_0  value = d * (q - 8),   q 0..15   grid 'signed', levels -8..7,   d = x[argmax |x|] / -8, fp16
    Q5_0  value = d * (q - 16),  q 0..31   grid 'signed', levels -16..15, d = x[argmax |x|] / -16, fp16
    Q4_1  value = d * q + m,     q 0..15   grid 'minmax', levels 0..15,   m = min (fp16), d = (max - m) / 15 (fp16)
    Q5_1  value = d * q + m,     q 0..31   grid 'minmax', levels 0..31,   m = min (fp16), d = (max - m) / 31 (fp16)
    Q8_0  value = d * q,         q -127..127 (int8)  grid 'absmax', d = max |x| / 127 (fp16)
A code is the index into the grid's sorted levels: q = code for the first four, q = code - 127 for Q8_0. The
'signed' sign convention is llama.cpp's: the block's largest-magnitude value maps to level -8 (-16), so d
carries the sign; d * level is exact in fp32 (fp16 d times a small integer), as gguf-py's dequantize computes
it, and (d * q) + m rounds once in both.

Byte layouts (per block; fp16 little-endian): Q4_0 d, qs[16]; Q4_1 d, m, qs[16]; Q5_0 d, qh[4], qs[16];
Q5_1 d, m, qh[4], qs[16]; Q8_0 d, qs[32] (int8). qs[j] = low 4 bits of element j | low 4 bits of element
j + 16 << 4; qh = bit 4 of every element, element i at bit i of a little-endian u32.
"""

from __future__ import annotations

import numpy as np
import torch

from kbitcli.core.grid import Grid
from kbitcli.errors import bad_input

BLOCK = 32
# qtype -> (grid kind, levels, norm: the level the block's base value maps to, has offset m, Q8_0's code shift)
LAYOUT = {
    "Q4_0": ("signed", torch.arange(-8, 8), -8.0),
    "Q5_0": ("signed", torch.arange(-16, 16), -16.0),
    "Q4_1": ("minmax", torch.arange(0, 16), 15.0),
    "Q5_1": ("minmax", torch.arange(0, 32), 31.0),
    "Q8_0": ("absmax", torch.arange(-127, 128), 127.0),
}
TYPES = tuple(LAYOUT)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def grid(qtype: str, candidates: int = 1) -> Grid:
    """The grid GPTQ / weighted RTN round a GGUF block onto; its values are what gguf-py decodes."""
    kind, levels, norm = LAYOUT[qtype]
    # d rounded to nearest fp16, as llama.cpp's quantizer stores it (Q4_0's d is signed: kbit's round-up rule,
    # made for non-negative absmax scales, does not apply)
    return Grid(levels.float(), lambda s, _ids: fp16_round(s), candidates=candidates, kind=kind, norm=norm,
                round_offset=fp16_round if kind == "minmax" else None)


def block_bytes(qtype: str) -> int:
    return {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[qtype]


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little").reshape(-1, 4)


def pack_blocks(qtype: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> np.ndarray:
    """codes [blocks, 32] (indices into grid(qtype).levels), d [blocks] (fp16-exact), m [blocks] for the _1
    types -> uint8 [blocks, block_bytes(qtype)], the GGUF block bytes."""
    codes = codes.reshape(-1, BLOCK)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(LAYOUT[qtype][1])):
        raise ValueError(f"{qtype}: codes out of range")
    d = d.reshape(-1).float()
    if not torch.isfinite(d).all() or (m is not None and not torch.isfinite(m).all()):
        raise bad_input(f"{qtype}: a block scale overflows fp16 (weights beyond +-65504 * level); keep that tensor "
                        "unquantized (--override NAME=skip)")
    parts = [_fp16_bytes(d)]
    if qtype in ("Q4_1", "Q5_1"):
        if m is None:
            raise ValueError(f"{qtype} needs the block minimum m")
        parts.append(_fp16_bytes(m.reshape(-1)))
    if qtype == "Q8_0":
        parts.append((codes - 127).to(torch.int8).numpy().view(np.uint8))
    else:
        q = codes.to(torch.uint8).numpy()
        if qtype in ("Q5_0", "Q5_1"):
            parts.append(_high_bits(q))
        parts.append(_nibbles(q))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def values(qtype: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """[blocks, 32] fp32 values of the blocks: what gguf.quants.dequantize gives for pack_blocks' bytes."""
    g = grid(qtype)
    return g.values(codes.reshape(-1, BLOCK).long(), d.reshape(-1, 1).float(),
                    m.reshape(-1).float() if m is not None else None)


def quantize(w: torch.Tensor, qtype: str, H: torch.Tensor, n: int, *, method: str, candidates: int = 1,
             damp: float = 0.01, act_order: bool = False, refine: int = 1, name: str = "tensor") -> tuple[dict, torch.Tensor]:
    """One weight [rows, cols] (cols a multiple of 32) on the GGUF grid. method 'gptq': H = sum x x^T over n
    tokens (GPTQ's Hessian is 2 H / n); 'rtn': H = sum x^2 (importance E[x^2] weighs the scale search).
    Returns ({codes u8 [rows, cols], d fp16 [rows, cols/32][, m fp16 [rows, cols/32]]}, dequantized fp32 w)."""
    from kbitcli.core.gptq import gptq, rtn

    rows, cols = w.shape[0], w[0].numel()
    if cols % BLOCK:
        raise ValueError(f"{qtype}: rows of {cols} values are not a multiple of {BLOCK}")
    W = w.reshape(rows, cols).float()
    g = grid(qtype, candidates)
    if method == "gptq":
        codes, scale, offset = gptq(W, H / n * 2, BLOCK, g, damp=damp, act_order=act_order, refine=refine)
    else:
        codes, scale, offset = rtn(W, BLOCK, g, H / n)
    if not torch.isfinite(scale).all() or (offset is not None and not torch.isfinite(offset).all()):
        raise bad_input(f"tensor {name!r}: a {qtype} block scale overflows fp16; keep it unquantized "
                        f"(--override '{name}=skip')")
    blocks = rows * cols // BLOCK
    deq = g.values(codes.view(blocks, BLOCK), scale[:, None], offset)
    out = {"codes": codes.to(torch.uint8).view(rows, cols), "d": scale.to(torch.float16).view(rows, -1)}
    if offset is not None:
        out["m"] = offset.to(torch.float16).view(rows, -1)
    return out, deq.view(w.shape)


def pack_rows(qtype: str, parts: dict) -> np.ndarray:
    """{codes [rows, cols], d [rows, cols/32][, m]} -> uint8 [rows, cols/32 * block_bytes], a tensor's GGUF data."""
    codes = parts["codes"]
    rows = codes.shape[0]
    data = pack_blocks(qtype, codes.long(), parts["d"].float(), parts["m"].float() if "m" in parts else None)
    return data.reshape(rows, -1)
