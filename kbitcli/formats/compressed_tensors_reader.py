"""Reading a compressed-tensors checkpoint (kbit decode / inspect / bench / load_model) without importing
compressed-tensors: pack-quantized int, naive/int-quantized int8 and float-quantized fp8, with tensor / channel /
group / block strategies, symmetric or not, in the layout formats/compressed_tensors.py documents. The scheme is
checked when the checkpoint is opened (unsupported num_bits or strategy: exit 2), part shapes against it (exit 1),
and scales finite on every read.
"""

from __future__ import annotations

import math
import os

import torch

from kbitcli.core.blockwise import finite
from kbitcli.errors import KbitError, bad_input
from kbitcli.formats.compressed_tensors import unpack_rows
from kbitcli.io.dtypes import from_name
from kbitcli.io.folder import TensorFiles as Files


READ_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized", "dense")
STRATEGIES = (None, "tensor", "channel", "group", "tensor_group", "block")  # None: one scale for the tensor
PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale", "weight_g_idx",
         "input_scale", "input_zero_point", "output_scale", "output_zero_point")


class CtCheckpoint:
    """A compressed-tensors checkpoint (pack-quantized int, naive/int-quantized int8, float-quantized fp8, with
    tensor / channel / group / block strategies, symmetric or not), dequantized by kbit's own code."""

    format = "compressed-tensors"

    def __init__(self, path: str):
        self.f = Files(path)
        self.path, self.is_folder, self.config, self.files = path, self.f.is_folder, self.f.config, self.f.files
        qc = self.config["quantization_config"]
        self.global_format = qc.get("format") or "dense"
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
            raise bad_input(f"{os.path.join(path, 'config.json')}: quantization_config.config_groups is not an object "
                            "of groups; it is not a compressed-tensors config")
        for name, g in groups.items():
            self._check_args(name, g.get("weights"))
        self.groups = list(groups.values())
        self.ignore = qc.get("ignore") or []
        modules = {k.rsplit(".", 1)[0] for k in self.f.keys if k.endswith((".weight_packed", ".weight_scale"))}
        self.schemes = {}  # "<module>.weight" -> (weights args, format)
        for m in sorted(modules):
            group = self._group(m)
            if group is None or not group.get("weights"):
                raise bad_input(f"{path}: {m} has quantized weights but no config_group of config.json targets it")
            fmt = group.get("format") or self.global_format
            if fmt not in READ_FORMATS:
                raise bad_input(f"{path}: compressed-tensors format {fmt!r} ({m}) is not read by kbit; it reads "
                                f"{', '.join(READ_FORMATS)}")
            self.schemes[f"{m}.weight"] = (group["weights"], fmt)
        self.shapes = {n: self._check_parts(n) for n in self.schemes}  # [rows, cols] of each quantized weight
        dropped = {f"{m.rsplit('.', 1)[0]}.{p}" for m in self.schemes for p in PARTS}
        self.names = []
        for k in self.f.keys:
            if k.endswith(".weight_packed"):
                self.names.append(k[: -len("_packed")])
            elif k not in dropped:
                self.names.append(k)
        cfg = self.config or {}
        self.model_dtype = from_name(cfg.get("dtype") or cfg.get("torch_dtype"))

    def _group(self, module: str):
        import re

        def hit(target: str) -> bool:
            if target.startswith("re:"):
                return re.match(target[3:], module) is not None
            # a class name (Linear, ...) targets every module of that class: here, every module holding weights
            return target == module or (target[:1].isupper() and "." not in target)

        for g in self.groups:
            if any(hit(t) for t in g.get("targets", [])):
                return g
        return None

    def _check_args(self, group: str, args) -> None:
        """A scheme kbit cannot unpack is bad input (exit 2) when the folder is opened, naming the config group."""
        at = f"{os.path.join(self.path, 'config.json')}: quantization_config.config_groups.{group}.weights"
        if not isinstance(args, dict):
            if args:
                raise bad_input(f"{at} is {args!r:.40}, not an object")
            return
        size = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        k, strategy, g, bs = map(args.get, ("num_bits", "strategy", "group_size", "block_structure"))
        if not size(k) or not 2 <= k <= 8:
            raise bad_input(f"{at}.num_bits is {k!r}; kbit reads compressed-tensors weights of 2 to 8 bits")
        if strategy not in STRATEGIES:
            raise bad_input(f"{at}.strategy is {strategy!r}; kbit reads {', '.join(map(str, STRATEGIES[1:]))}")
        if strategy in ("group", "tensor_group") and not size(g):
            raise bad_input(f"{at}.group_size is {g!r}; strategy {strategy} needs a positive group size")
        if strategy == "block" and not (isinstance(bs, list) and len(bs) == 2 and all(map(size, bs))):
            raise bad_input(f"{at}.block_structure is {bs!r}; strategy block needs [rows, columns]")

    def _damaged(self, key: str, name: str, what: str) -> KbitError:
        """Exit 1, worded as KbitCheckpoint's: the stored parts disagree with weight_shape and the scheme (an edited
        or truncated part, NaN scales), so dequantizing them would give garbage."""
        return KbitError(f"{self.f.where.get(key, self.path)}: tensor {name!r} is damaged ({what}); run `kbit inspect "
                         f"{self.path} --verify` to check every file against the manifest, then re-export or restore "
                         "it", exit_code=1)

    def _check_parts(self, name: str) -> tuple[int, int]:
        """[rows, cols] of a quantized weight, its parts' shapes checked against them and the scheme from the headers
        (plus weight_shape's two values) when the folder is opened, so nothing is reshaped into garbage later."""
        args, fmt = self.schemes[name]
        m, k, strategy = self._m(name), args["num_bits"], args.get("strategy")
        for key in (f"{m}.weight_shape", f"{m}.weight_packed") if fmt == "pack-quantized" else (name,):
            if key not in self.f:
                raise self._damaged(key, name, f"part {key!r} is missing")
        if fmt == "pack-quantized":
            ws, key = self.f.get(f"{m}.weight_shape"), f"{m}.weight_packed"
            if ws.is_floating_point() or ws.shape != (2,) or (ws < 1).any():
                raise self._damaged(f"{m}.weight_shape", name, f"weight_shape is {ws.reshape(-1)[:4].tolist()}, "
                                    "not [rows, columns]")
            rows, cols = ws.tolist()
            want = (rows, -(-cols * k // 32))  # k-bit codes densely packed in int32 words, per row
            dt, got = self.f.dtype(key), self.f.shape(key)
            if dt != torch.int32 or got != want:
                raise self._damaged(key, name, f"{key} is {str(dt).removeprefix('torch.')} {list(got)}; weight_shape "
                                    f"{[rows, cols]} at {k} bits implies int32 {list(want)}")
        elif len(self.f.shape(name)) != 2:
            raise self._damaged(name, name, f"it has shape {list(self.f.shape(name))}, not [rows, columns]")
        else:
            rows, cols = self.f.shape(name)
        key = f"{m}.weight_scale"
        if key not in self.f:
            raise self._damaged(key, name, f"part {key!r} is missing")
        got = self.f.shape(key)
        if strategy in ("group", "tensor_group"):
            want = (rows, -(-cols // args["group_size"]))
        elif strategy == "block":
            want = (-(-rows // args["block_structure"][0]), -(-cols // args["block_structure"][1]))
        else:
            want = (rows, 1) if strategy == "channel" else (1,)
        # block scales are repeated along both dimensions, so their 2-D shape matters; the others are reshaped
        if (got != want) if strategy == "block" else math.prod(got) != math.prod(want):
            raise self._damaged(key, name, f"{key} is {list(got)}; {rows}x{cols} at strategy {strategy} has "
                                f"{math.prod(want)} scales")
        zkey = f"{m}.weight_zero_point"
        if zkey in self.f and not args.get("symmetric", True):  # packed along dim 0 as int32, or one per scale
            packed = fmt == "pack-quantized" and self.f.dtype(zkey) == torch.int32
            zwant = (-(-rows * k // 32), got[-1] if len(got) > 1 else 1) if packed else got
            if (self.f.shape(zkey) != zwant) if packed else math.prod(self.f.shape(zkey)) != math.prod(got):
                raise self._damaged(zkey, name, f"{zkey} is {list(self.f.shape(zkey))}, its scales {list(got)}")
        return rows, cols

    def is_quantized(self, name: str) -> bool:
        return name in self.schemes

    def _m(self, name: str) -> str:
        return name[: -len(".weight")]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name] if name in self.schemes else self.f.shape(name)

    def orig_dtype(self, name: str) -> torch.dtype:
        if name in self.schemes:
            return self.model_dtype or self.f.dtype(f"{self._m(name)}.weight_scale")
        return self.f.dtype(name)

    def dense(self, name: str) -> torch.Tensor:
        return self.f.get(name)

    def codes(self, name: str) -> torch.Tensor:
        """The integer (or fp8) values q as stored, [rows, cols], before (q - zero_point) * scale."""
        args, fmt = self.schemes[name]
        m = self._m(name)
        if fmt == "pack-quantized":
            rows, cols = self.shape(name)
            k = int(args["num_bits"])
            return unpack_rows(self.f.get(f"{m}.weight_packed"), k, cols) - 2 ** (k - 1)
        return self.f.get(name)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.schemes:
            t = self.f.get(name)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        args, fmt = self.schemes[name]
        m = self._m(name)
        q = self.codes(name).float()
        rows, cols = q.shape
        scale = self.f.get(f"{m}.weight_scale").float()
        parts = {f"{m}.weight_scale": scale}
        zp = None
        if f"{m}.weight_zero_point" in self.f and not args.get("symmetric", True):
            zp = self.f.get(f"{m}.weight_zero_point")
            if fmt == "pack-quantized" and zp.dtype == torch.int32:
                k = int(args["num_bits"])
                groups = scale.shape[-1] if scale.dim() > 1 else 1
                zp = unpack_rows(zp.t().contiguous(), k, rows).t() - 2 ** (k - 1)
                zp = zp.reshape(rows, groups)
            zp = parts[f"{m}.weight_zero_point"] = zp.float()
        if f"{m}.weight_global_scale" in self.f:
            parts[f"{m}.weight_global_scale"] = gs = self.f.get(f"{m}.weight_global_scale").float()
            scale = scale / gs
        for key, t in parts.items():  # one float64 sum each (NaN and Inf survive it), never over the codes
            if not finite(t):
                raise self._damaged(key, name, f"NaN or Inf in its {key.rsplit('.', 1)[1]}")
        strategy = args.get("strategy")
        # each weight's group by index (column // group size), never by repeating a scale group-size times: a
        # group size larger than the row is one group per row, not a huge allocation
        if strategy == "group" or strategy == "tensor_group":
            col_group = torch.arange(cols) // int(args["group_size"])
            scale = scale.reshape(rows, -1)[:, col_group]
            zp = None if zp is None else zp.reshape(rows, -1)[:, col_group]
        elif strategy == "block":
            bh, bw = args["block_structure"]
            row_block, col_block = (torch.arange(rows) // bh)[:, None], (torch.arange(cols) // bw)[None, :]
            scale = scale[row_block, col_block]
            zp = None if zp is None else zp[row_block, col_block]
        elif strategy == "channel":
            scale = scale.reshape(rows, 1)
            zp = None if zp is None else zp.reshape(rows, 1)
        else:  # tensor
            scale = scale.reshape(1, 1)
            zp = None if zp is None else zp.reshape(1, 1)
        w = (q - zp) * scale if zp is not None else q * scale
        return w.to(dtype or self.orig_dtype(name))

    def write_side_files(self, folder: str) -> None:
        self.f.copy_side_files(folder)

    def describe(self, name: str) -> dict:
        if name not in self.schemes:
            dt = self.f.dtype(name)
            return {"bytes": math.prod(self.f.shape(name)) * dt.itemsize, "data_type": str(dt).removeprefix("torch.")}
        args, fmt = self.schemes[name]
        m = self._m(name)
        keys = [f"{m}.{p}" for p in PARTS if p.startswith("weight")] + [name]  # everything stored for it
        keys = [k for k in keys if k in self.f]
        nbytes = sum(math.prod(self.f.shape(k)) * self.f.dtype(k).itemsize for k in keys)
        strategy = args.get("strategy")
        block = args.get("group_size") if strategy == "group" else {"channel": "row"}.get(strategy, strategy)
        kind = f"{args.get('type', 'int')}{args.get('num_bits')}" + ("" if args.get("symmetric", True) else " asym")
        return {"bytes": nbytes, "bits": args.get("num_bits"), "block_size": block, "data_type": kind}
