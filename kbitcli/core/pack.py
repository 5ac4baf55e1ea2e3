"""Dense bit packing of k-bit codes (k = 1..8) into bytes, MSB first.

Code i occupies stream bits [i*k, (i+1)*k); stream bit j is bit (7 - j % 8) of byte j // 8, and a code's
own bits go most significant first. So 3-, 5-, 6- and 7-bit codes waste nothing, the packed size is exactly
ceil(n * k / 8) bytes (the unused low bits of the last byte are zero), and at k = 4 the layout is
bitsandbytes' (first code in the high nibble).

Vectorised over groups of 8 codes, which always fill exactly k bytes: byte j of a group is the OR of the
(at most three) codes that overlap it, each shifted into place. All of it is uint8 arithmetic — a left
shift drops the bits that belong to the previous byte by itself — so packing costs about two cheap passes
over the codes instead of widening them to int64 words (the old way, 8x the memory traffic).
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, k: int) -> int:
    return (n * k + 7) // 8


def _overlaps(k: int, byte: int) -> list[tuple[int, int]]:
    """(code index in the group, shift) of every code overlapping `byte` of an 8-code group.

    shift = where the code's lowest bit lands, counted from the byte's lowest bit: >= 0 means shift the code
    left by that much, < 0 means its lowest bits belong to a later byte (shift right by -shift)."""
    return [(i, 8 * (byte + 1) - k * (i + 1)) for i in range(8) if k * i < 8 * (byte + 1) and k * (i + 1) > 8 * byte]


def _as_groups(codes: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8), 8] view of the codes, zero-filled at the end (copies only when it must)."""
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    if n % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - n % 8)])
    return flat.view(-1, 8)


def pack_into(codes: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Pack codes (any integer dtype, values in [0, 2^k)) into out: uint8 [packed_nbytes(numel, k)]."""
    n = codes.numel()
    if k == 8:
        return out.copy_(codes.reshape(-1))
    groups = _as_groups(codes, n)
    whole = n // 8  # groups that fill their k bytes; a partial last group is cut to packed_nbytes
    bytes_ = torch.empty(groups.shape[0], k, dtype=torch.uint8) if n % 8 else out[: whole * k].view(whole, k)
    tmp = torch.empty(groups.shape[0], dtype=torch.uint8)
    for j in range(k):
        dst = bytes_[:, j]
        for idx, (i, shift) in enumerate(_overlaps(k, j)):
            src = groups[:, i]
            part = dst if idx == 0 else tmp
            if shift >= 0:
                torch.bitwise_left_shift(src, shift, out=part)
            else:
                torch.bitwise_right_shift(src, -shift, out=part)
            if idx:
                dst.bitwise_or_(part)
    if n % 8:
        out.copy_(bytes_.reshape(-1)[: out.numel()])
    return out


def pack(codes: torch.Tensor, k: int) -> torch.Tensor:
    """codes: integer tensor of values in [0, 2^k) -> uint8 tensor of packed_nbytes(numel, k) bytes."""
    return pack_into(codes, k, torch.empty(packed_nbytes(codes.numel(), k), dtype=torch.uint8))


def unpack_u8(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first n codes, as uint8."""
    flat = packed.reshape(-1)
    if flat.numel() != packed_nbytes(n, k):
        raise ValueError(f"{flat.numel()} packed bytes cannot hold exactly {n} {k}-bit codes")
    if k == 8:
        return flat.clone()
    groups = (n + 7) // 8
    if flat.numel() != groups * k:  # a partial last group: zero-fill it to k bytes
        flat = torch.cat([flat, flat.new_zeros(groups * k - flat.numel())])
    b = flat.view(groups, k)
    codes = torch.empty(groups, 8, dtype=torch.uint8)
    tmp = torch.empty(groups, dtype=torch.uint8)
    mask = (1 << k) - 1
    for i in range(8):
        dst = codes[:, i]
        first, last = k * i // 8, (k * (i + 1) - 1) // 8  # the (one or two) bytes holding code i
        torch.bitwise_right_shift(b[:, last], 8 * (last + 1) - k * (i + 1), out=dst)
        if first != last:  # the high bits sit at the bottom of the byte before: shift them up (uint8 drops the rest)
            torch.bitwise_left_shift(b[:, first], k * (i + 1) - 8 * (first + 1), out=tmp)
            dst.bitwise_or_(tmp)
        dst.bitwise_and_(mask)
    return codes.reshape(-1)[:n]


def unpack(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first n codes, as int64 (fit for indexing a codebook)."""
    return unpack_u8(packed, k, n).long()
