"""A reference decoder for kbit checkpoints, written from docs/FORMAT.md alone.

Pure numpy and the standard library: it parses the safetensors container itself (struct + json), unpacks
the codes with the byte-window formula of FORMAT.md section 3.2 (not kbit's own word-at-a-time packer),
and applies sections 3.3 / 3.4 literally. It imports nothing from kbitcli and no torch, so agreeing with
`kbit decode` bit for bit shows that the spec says everything a decoder needs.

Arrays of BF16 tensors are returned as uint16 bit patterns (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

SUPPORTED_VERSION = 1
# safetensors dtype -> numpy dtype of the stored bytes (BF16 kept as raw 16-bit patterns)
NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "I8": np.int8,
      "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
# FORMAT.md 2.4 `orig_dtype` / decode `--torch-dtype` names -> safetensors dtype
ST_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
           "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
SCALE_ST = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
COMPONENTS = ("codes", "scales", "scales_absmax", "scales_offset", "codebook")


class FormatError(ValueError):
    pass


def read_safetensors(path: str) -> tuple[dict, dict]:
    """-> (metadata, {key: numpy array}) for one safetensors file (section 2.1)."""
    with open(path, "rb") as fh:
        blob = fh.read()
    if len(blob) < 8:
        raise FormatError(f"{path}: shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if 8 + hlen > len(blob):
        raise FormatError(f"{path}: header runs past the end of the file")
    header = json.loads(blob[8 : 8 + hlen].decode("utf-8"))
    data = memoryview(blob)[8 + hlen :]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        dt = np.dtype(NP[info["dtype"]]).newbyteorder("<")
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * dt.itemsize or end > len(data):
            raise FormatError(f"{path}: {key}: data_offsets do not fit dtype and shape")
        tensors[key] = (info["dtype"], np.frombuffer(data[begin:end], dtype=dt).reshape(shape))
    return metadata, tensors


def checkpoint_files(path: str) -> list[str]:
    """Section 1: a single file, or a folder with an index (shards) or one model.safetensors."""
    if not os.path.isdir(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            names = list(dict.fromkeys(json.load(fh)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    return [os.path.join(path, "model.safetensors")]


def unpack(codes: np.ndarray, k: int, n: int) -> np.ndarray:
    """Section 3.2: code i = (big-endian 16 bits at byte floor(i k / 8)) >> (16 - k - (i k mod 8)) & (2^k - 1)."""
    if codes.size != (n * k + 7) // 8:
        raise FormatError(f"{codes.size} bytes cannot hold exactly {n} {k}-bit codes")
    b = np.concatenate([codes.astype(np.uint32), np.zeros(1, np.uint32)])  # a missing second byte counts as 0
    bit = np.arange(n, dtype=np.int64) * k
    byte = bit // 8
    window = (b[byte] << 8) | b[byte + 1]
    return ((window >> (16 - k - (bit % 8)).astype(np.uint32)) & ((1 << k) - 1)).astype(np.int64)


def as_float32(st_dtype: str, arr: np.ndarray) -> np.ndarray:
    """Exact conversion of F16 / BF16 / F32 storage to float32."""
    if st_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def float32_to(st_dtype: str, y: np.ndarray) -> np.ndarray:
    """float32 -> the stored form of st_dtype, rounding to nearest even (BF16 as uint16 bit patterns)."""
    if st_dtype == "F32":
        return y
    if st_dtype == "F16":
        return y.astype(np.float16)
    if st_dtype == "F64":
        return y.astype(np.float64)
    if st_dtype == "BF16":
        u = y.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    raise FormatError(f"cannot convert float32 to {st_dtype}")


def scales(name: str, m: dict, t: dict) -> np.ndarray:
    """Section 3.4: the float32 scale of every block."""
    st, raw = t[f"{name}.scales"]
    if not m["double_quant"]:
        if st != SCALE_ST[m["scale_dtype"]]:
            raise FormatError(f"{name}.scales is {st}, metadata says {m['scale_dtype']}")
        return as_float32(st, raw)
    if st != "U8":
        raise FormatError(f"{name}.scales must be U8 codes with double quantization")
    d = t[m["scales_codebook"]][1]
    a = t[f"{name}.scales_absmax"][1]
    o = t[f"{name}.scales_offset"][1][0]
    j = np.arange(raw.size) // 256
    product = (d[raw.astype(np.int64)] * a[j]).astype(np.float32)  # rounded to float32 ...
    return (product + np.float32(o)).astype(np.float32)  # ... then the add, rounded again


def dequantize(name: str, m: dict, t: dict) -> np.ndarray:
    """Sections 3.1-3.3: float32 values in the original shape."""
    n, k, B = math.prod(m["shape"]), m["bits"], m["block_size"]
    c = unpack(t[f"{name}.codes"][1], k, n)
    q = t[m["codebook"]][1]
    if q.dtype != np.float32 or c.max(initial=0) >= q.size:
        raise FormatError(f"{name}: code out of range of its {q.size}-entry codebook")
    s = scales(name, m, t)
    if s.size != math.ceil(n / B):
        raise FormatError(f"{name}: {s.size} scales for {math.ceil(n / B)} blocks")
    y = (q[c] * s[np.arange(n) // B]).astype(np.float32)
    return y.reshape(m["shape"])


def decode(path: str, dtype: str | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of the checkpoint: name -> (safetensors dtype, array). dtype: None (each tensor's
    original dtype) or fp32 / fp16 / bf16 for every floating-point tensor, as `kbit decode --torch-dtype`."""
    out = {}
    for f in checkpoint_files(path):
        meta, t = read_safetensors(f)
        if meta.get("format") != "kbit":
            raise FormatError(f"{f}: not a kbit file")
        if int(meta["kbit.format_version"]) > SUPPORTED_VERSION:
            raise FormatError(f"{f}: format version {meta['kbit.format_version']} is too new")
        quantized = json.loads(meta["kbit.tensors"])
        parts = {f"{q}.{c}" for q in quantized for c in COMPONENTS}
        for key, (st, arr) in t.items():
            if key in parts or key.startswith("kbit.codebook."):
                continue
            want = ST_NAME[dtype] if dtype and st in ("F32", "F16", "BF16", "F64") else st
            if want == st:
                out[key] = (st, arr)
            elif st == "F64" and want != "BF16":
                out[key] = (want, arr.astype(NP[want]))  # one rounding, straight from float64
            else:
                out[key] = (want, float32_to(want, as_float32(st, arr)))
        for name, m in quantized.items():
            want = ST_NAME[dtype or m["orig_dtype"]]
            out[name] = (want, float32_to(want, dequantize(name, m, t)))
    return out


def read_dense(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """A plain (decoded) safetensors file or folder, with the same parser: name -> (dtype, array)."""
    out = {}
    for f in checkpoint_files(path):
        out.update(read_safetensors(f)[1])
    return out
