"""Reading a bitsandbytes checkpoint (kbit decode / inspect / bench / load_model) without importing bitsandbytes:
4-bit nf4/fp4 (with or without double quant) and 8-bit LLM.int8 rows, in the layout formats/bnb.py documents.
Every part's size and dtype is checked against its quant_state when the checkpoint is opened, and the scales
are checked finite on every read: a damaged checkpoint is exit 1 naming the tensor, never garbage.
"""

from __future__ import annotations

import json
import math

import torch

from kbitcli.core import codebooks
from kbitcli.core.blockwise import DQ_BLOCK, QuantizedTensor, Spec, dequantize, finite
from kbitcli.errors import KbitError
from kbitcli.io.dtypes import from_name
from kbitcli.io.folder import TensorFiles as Files


class BnbCheckpoint:
    """A bitsandbytes checkpoint (4-bit nf4/fp4 with or without double quant, or 8-bit LLM.int8 `SCB` rows),
    dequantized by kbit's own code from the layout formats/bnb.py documents."""

    format = "bnb"

    def __init__(self, path: str):
        self.f = Files(path)
        self.path, self.is_folder, self.config, self.files = path, self.f.is_folder, self.f.config, self.f.files
        self.states: dict[str, dict] = {}  # 4-bit weight -> its quant_state JSON
        self.int8: set[str] = set()  # 8-bit weights (with .SCB)
        parts = set()
        for k in self.f.keys:
            if ".quant_state.bitsandbytes__" in k:
                w = k.split(".quant_state.bitsandbytes__")[0]
                try:
                    self.states[w] = json.loads(bytes(self.f.get(k).numpy()).decode())
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    raise self._damaged(k, w, f"its quant_state is not JSON: {str(e)[:100]}") from None
                self._check_4bit(w, k)
                parts |= {k} | {f"{w}.{s}" for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
            elif k.endswith(".SCB"):
                w = k[: -len(".SCB")] + ".weight"
                self.int8.add(w)
                parts |= {k, k[: -len(".SCB")] + ".weight_format"}
        self.names = [k for k in self.f.keys if k not in parts]
        for w in self.int8:  # LLM.int8: one absmax (SCB) per weight row
            scb = w[: -len("weight")] + "SCB"
            if w not in self.f or len(self.f.shape(w)) != 2 or self.f.shape(scb) != self.f.shape(w)[:1]:
                raise self._damaged(scb, w, f"{scb} does not hold one value per row of the weight")
        cfg = self.config or {}
        self.model_dtype = from_name(cfg.get("dtype") or cfg.get("torch_dtype"))

    def _damaged(self, key: str, name: str, what: str) -> KbitError:
        """Exit 1, worded as KbitCheckpoint's: parts that disagree with the quant_state would decode to garbage."""
        return KbitError(f"{self.f.where.get(key, self.path)}: tensor {name!r} is damaged ({what}); run `kbit inspect "
                         f"{self.path} --verify` to check every file against the manifest, then re-export or restore "
                         "it", exit_code=1)

    def _check_4bit(self, name: str, key: str) -> None:
        """The quant_state (at key) against the stored parts' sizes, from the safetensors headers (no data read) when
        the checkpoint is opened: inspect, decode and load all refuse an edited shape or blocksize up front."""
        st = self.states[name]
        if not isinstance(st, dict):
            raise self._damaged(key, name, "its quant_state is not a JSON object")
        dq = f"{name}.nested_absmax" in self.f
        size = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        qtype, block, shape, nb, off = map(st.get, ("quant_type", "blocksize", "shape", "nested_blocksize",
                                                    "nested_offset"))
        # the conditions short-circuit before any arithmetic on a value of the wrong type
        for field, bad in (("quant_type", qtype not in ("nf4", "fp4") or qtype != key.rsplit("__", 1)[1]),
                           ("blocksize", not size(block) or block & (block - 1)),  # a power of two
                           ("shape", not isinstance(shape, list) or not shape or not all(map(size, shape))),
                           ("dtype", from_name(st.get("dtype", "float32")) not in (torch.float32, torch.float16,
                                                                                   torch.bfloat16)),
                           ("nested_blocksize", dq and not size(nb)),
                           ("nested_offset", dq and not (isinstance(off, (int, float)) and math.isfinite(off)))):
            if bad:
                raise self._damaged(key, name, f"its quant_state has a bad {field}: {st.get(field)!r:.40}")
        n = math.prod(shape)
        blocks = -(-n // block)
        counts = {name: None, f"{name}.absmax": blocks, f"{name}.quant_map": 16}
        if dq:
            counts.update({f"{name}.nested_absmax": -(-blocks // nb), f"{name}.nested_quant_map": 256})
        for k, count in counts.items():
            if k not in self.f:
                raise self._damaged(key, name, f"part {k!r} is missing")
            dt = self.f.dtype(k)
            if k == name:  # two codes a byte, in (n + 1) // (2 * itemsize) elements of bnb's quant_storage dtype
                count = (n + 1) // (2 * dt.itemsize)
            elif not (dt == torch.uint8 if dq and k == f"{name}.absmax" else dt.is_floating_point):
                raise self._damaged(k, name, f"{k} is {str(dt).removeprefix('torch.')}")
            if math.prod(self.f.shape(k)) != count:
                raise self._damaged(k, name, f"{k} holds {math.prod(self.f.shape(k))} values; the quant_state's shape "
                                    f"{shape} and blocksize {block} imply {count}")

    def _finite(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        """NaN or Inf in the small tables (never the codes): one float64 sum each, which NaN and Inf survive."""
        for k, t in parts.items():
            if t.is_floating_point() and not finite(t):
                raise self._damaged(k, name, f"NaN or Inf in its {k.rsplit('.', 1)[1]}")

    def is_quantized(self, name: str) -> bool:
        return name in self.states or name in self.int8

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.states:
            return tuple(self.states[name]["shape"])
        return self.f.shape(name)

    def orig_dtype(self, name: str) -> torch.dtype:
        if name in self.states:
            return from_name(self.states[name].get("dtype")) or torch.float32
        if name in self.int8:
            return self.model_dtype or torch.float16
        return self.f.dtype(name)

    def dense(self, name: str) -> torch.Tensor:
        return self.f.get(name)

    def quantized(self, name: str):
        """The 4-bit weight as a kbit QuantizedTensor (quant_map in code order is the codebook). Double quant is
        kept as kbit's (same 8-bit dynamic map, blocks of 256); any other nested layout is decoded to fp32 scales."""
        st = self.states[name]
        qtype = st["quant_type"]
        spec_dtype = "nf" if qtype == "nf4" else "fp"
        codebook = self.f.get(f"{name}.quant_map").float()
        absmax = self.f.get(f"{name}.absmax")
        self._finite(name, {f"{name}.quant_map": codebook, f"{name}.absmax": absmax})
        packed = self.f.get(name).reshape(-1)
        codes = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)  # bnb_4bit_quant_storage
        shape = tuple(st["shape"])
        dtype = from_name(st.get("dtype")) or torch.float32
        if f"{name}.nested_absmax" not in self.f:
            return QuantizedTensor(Spec(4, st["blocksize"], spec_dtype, False, "fp32"), shape, dtype, codes,
                                   absmax.float(), codebook)
        nested_map = self.f.get(f"{name}.nested_quant_map").float()
        amax2 = self.f.get(f"{name}.nested_absmax").float()
        self._finite(name, {f"{name}.nested_quant_map": nested_map, f"{name}.nested_absmax": amax2})
        offset = torch.tensor([float(st["nested_offset"])], dtype=torch.float32)
        if st.get("nested_blocksize") == DQ_BLOCK and torch.equal(nested_map, codebooks.dynamic_codebook(8)):
            return QuantizedTensor(Spec(4, st["blocksize"], spec_dtype, True, "fp32"), shape, dtype, codes,
                                   absmax, codebook, amax2, offset)
        idx = torch.arange(absmax.numel()) // int(st["nested_blocksize"])
        scales = nested_map[absmax.long()] * amax2[idx] + offset
        spec = Spec(4, st["blocksize"], spec_dtype, False, "fp32")
        return QuantizedTensor(spec, shape, dtype, codes, scales, codebook)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.states:
            qt = self.quantized(name)
            return dequantize(qt, dtype or qt.orig_dtype)
        if name in self.int8:  # LLM.int8 rows: weight int8, SCB = absmax of each row
            key = name[: -len(".weight")] + ".SCB"
            scb = self.f.get(key).float()
            self._finite(name, {key: scb})
            w = self.f.get(name).float() * (scb[:, None] / 127.0)
            return w.to(dtype or self.orig_dtype(name))
        t = self.f.get(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def write_side_files(self, folder: str) -> None:
        self.f.copy_side_files(folder)

    def describe(self, name: str) -> dict:
        if name in self.states:
            st = self.states[name]
            n = math.prod(st["shape"])
            # everything stored for the weight: codes, absmax, the per-tensor tables and the quant_state JSON
            keys = [name] + [f"{name}.{s}" for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")]
            keys += [k for k in self.f.keys if k.startswith(f"{name}.quant_state.")]
            nbytes = sum(math.prod(self.f.shape(k)) * self.f.dtype(k).itemsize for k in keys if k in self.f)
            dq = f"{name}.nested_absmax" in self.f
            return {"bytes": nbytes, "bits": 4, "block_size": st["blocksize"], "double_quant": dq,
                    "data_type": st["quant_type"], "numel": n}
        if name in self.int8:
            rows = self.f.shape(name)[0]
            return {"bytes": math.prod(self.f.shape(name)) + rows * 4, "bits": 8, "block_size": "row",
                    "data_type": "int8 (LLM.int8)"}
        dt = self.f.dtype(name)
        return {"bytes": math.prod(self.f.shape(name)) * dt.itemsize, "data_type": str(dt).removeprefix("torch.")}
