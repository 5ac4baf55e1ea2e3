"""Dense MSB-first bit packing: exact sizes, the documented bit order, and round trips for every k and length."""

from __future__ import annotations

import pytest
import torch

from kbitcli.core.pack import pack, packed_nbytes, unpack

LENGTHS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 127, 1000, 4099]


def reference_pack(codes: list[int], k: int) -> bytes:
    """FORMAT.md 3.2 literally: concatenate each code's k bits, most significant first; zero-pad to a byte."""
    bits = "".join(format(c, f"0{k}b") for c in codes)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def random_codes(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**k, (n,), generator=g)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_size(k, n):
    codes = random_codes(n, k, seed=1000 * k + n)
    packed = pack(codes, k)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, k) == (n * k + 7) // 8
    assert torch.equal(unpack(packed, k, n), codes)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 8, 13, 65])
def test_bit_order_is_msb_first_stream(k, n):
    codes = random_codes(n, k, seed=7 * k + n)
    assert bytes(pack(codes, k).tolist()) == reference_pack(codes.tolist(), k)


def test_worked_example_of_the_spec():
    assert pack(torch.tensor([5, 3, 7, 0, 1]), 3).tolist() == [0xAF, 0x82]
    assert pack(torch.tensor([5, 3, 7, 0, 1, 6, 2, 4, 3]), 3).tolist() == [0xAF, 0x83, 0x94, 0x60]


def test_k4_is_bitsandbytes_nibble_order():
    # bitsandbytes: byte = (code[2i] << 4) | code[2i+1], first element in the high nibble
    codes = random_codes(101, 4, seed=3)
    padded = torch.cat([codes, torch.zeros(1, dtype=codes.dtype)])
    expect = (padded[0::2] << 4) | padded[1::2]
    assert torch.equal(pack(codes, 4), expect.to(torch.uint8))


@pytest.mark.parametrize("k", range(1, 8))
def test_no_wasted_bits(k):
    # 8 codes of k bits fill exactly k bytes; 3-, 5-, 6-, 7-bit codes are not rounded up to 4 or 8 bits
    assert pack(random_codes(8000, k, seed=k), k).numel() == 1000 * k


@pytest.mark.parametrize("k", range(1, 8))
def test_padding_bits_of_the_last_byte_are_zero(k):
    n = 8 * 5 + 3  # a partial group at the end
    packed = pack(torch.full((n,), 2**k - 1), k)  # all ones
    used = n * k % 8
    if used:
        assert packed[-1].item() & ((1 << (8 - used)) - 1) == 0
        assert packed[-1].item() >> (8 - used) == (1 << used) - 1


def test_extreme_codes_survive():
    for k in range(1, 9):
        codes = torch.tensor([0, 2**k - 1] * 37 + [2**k - 1])
        assert torch.equal(unpack(pack(codes, k), k, codes.numel()), codes)


def test_accepts_any_integer_dtype_and_shape():
    codes = random_codes(6 * 7, 5, seed=9)
    for dt in (torch.uint8, torch.int32, torch.int64):
        assert torch.equal(pack(codes.to(dt).reshape(6, 7), 5), pack(codes, 5))


def test_unpack_refuses_a_wrong_byte_count():
    packed = pack(random_codes(10, 3, seed=0), 3)
    with pytest.raises(ValueError):
        unpack(packed, 3, 20)
    with pytest.raises(ValueError):
        unpack(packed[:-1], 3, 10)
