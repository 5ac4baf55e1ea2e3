"""Dense bit packing of k-bit codes (k = 1..8) into bytes, MSB first.

Code i occupies stream bits [i*k, (i+1)*k); stream bit j is bit (7 - j % 8) of byte j // 8, and a code's
own bits go most significant first. So 3-, 5-, 6- and 7-bit codes waste nothing, the packed size is exactly
ceil(n * k / 8) bytes (the unused low bits of the last byte are zero), and at k = 4 the layout is
bitsandbytes' (first code in the high nibble).

Vectorised: 8 codes always fill exactly k bytes, so we work on groups of 8 codes held in one int64
(8 * k <= 56 bits for k < 8; k = 8 is a plain byte copy).
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, k: int) -> int:
    return (n * k + 7) // 8


def pack(codes: torch.Tensor, k: int) -> torch.Tensor:
    """codes: integer tensor of values in [0, 2^k) -> uint8 tensor of packed_nbytes(numel, k) bytes."""
    flat = codes.reshape(-1)
    n = flat.numel()
    if k == 8:
        return flat.to(torch.uint8).clone()
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64)
    padded[:n] = flat.to(torch.int64)
    g = padded.view(groups, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * k  # first code in the most significant bits
    word = (g << shifts).sum(dim=1)  # disjoint bit fields: sum == bitwise or
    byte_shifts = torch.arange(k - 1, -1, -1, dtype=torch.int64) * 8
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, k)].clone()


def unpack(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first n codes, as int64 (fit for indexing a codebook)."""
    flat = packed.reshape(-1)
    if flat.numel() != packed_nbytes(n, k):
        raise ValueError(f"{flat.numel()} packed bytes cannot hold exactly {n} {k}-bit codes")
    if k == 8:
        return flat.to(torch.int64)
    groups = (n + 7) // 8
    padded = torch.zeros(groups * k, dtype=torch.int64)
    padded[: flat.numel()] = flat.to(torch.int64)
    b = padded.view(groups, k)
    byte_shifts = torch.arange(k - 1, -1, -1, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * k
    codes = (word.unsqueeze(1) >> shifts) & ((1 << k) - 1)
    return codes.reshape(-1)[:n]
