"""Plan every tensor before touching any data (as llama-quantize does): what happens to it, with which
settings, what it will occupy on disk, and which output shard it lands in.

All recipe errors (patterns that match nothing, block sizes that do not fit, NaN-free is checked later
while streaming) surface here, so `--dry-run` and bad input cost no work and write nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kbitcli.core.blockwise import Spec, layout, resolve_block
from kbitcli.core.codebooks import fixed_codebook
from kbitcli.errors import bad_input
from kbitcli.io.safetensors_stream import nbytes
from kbitcli.recipes import Recipe, is_default_target, matches


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored in the source
    spec: Spec | None  # None: kept dense
    rule: str  # why: "default", "targets", "override <pattern>", "ignore <pattern>", "not a target"
    block_label: int | str | None = None  # the block size as asked for (64, "row", "tensor")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    def outputs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The (key, dtype, shape) entries this tensor writes in the native format."""
        if self.spec is None:
            return [(self.name, self.dtype, self.shape)]
        return [(f"{self.name}.{suffix}", dt, shape) for suffix, (dt, shape) in layout(self.spec, self.numel).items()]

    def out_bytes(self) -> int:
        return sum(nbytes(dt, shape) for _, dt, shape in self.outputs())

    def in_bytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def bits_per_param(self) -> float:
        return self.out_bytes() * 8 / self.numel if self.numel else 0.0

    def as_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
             "quantized": self.quantized, "rule": self.rule, "bytes_in": self.in_bytes(), "bytes_out": self.out_bytes(),
             "bits_per_param": round(self.bits_per_param(), 4)}
        if self.spec:
            d.update(bits=self.spec.bits, block_size=self.block_label, block_values=self.spec.block_size,
                     data_type=self.spec.dtype, double_quant=self.spec.double_quant, scale_dtype=self.spec.scale_dtype,
                     scale_search=self.spec.scale_search, scale_refit=self.spec.scale_refit, method=self.spec.method)
        return d


@dataclass
class Plan:
    tensors: list[TensorPlan]
    recipe: Recipe
    shards: list[list[TensorPlan]] = field(default_factory=list)

    @property
    def quantized(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.quantized]

    def shared_codebooks(self, tensors: list[TensorPlan] | None = None) -> dict[str, torch.Tensor]:
        """Tables the quantized `tensors` (default: all) index, stored once per file: key -> float32 table.
        The fixed data types' tables, and the 8-bit dynamic table that double-quantized scales index."""
        out = {}
        for t in self.quantized if tensors is None else [t for t in tensors if t.quantized]:
            if t.spec.dtype != "quantile":
                out[codebook_key(t.spec.dtype, t.spec.bits)] = fixed_codebook(t.spec.dtype, t.spec.bits)
            if t.spec.double_quant:
                out[codebook_key("dynamic", 8)] = fixed_codebook("dynamic", 8)
        return out

    def summary(self) -> dict:
        q = self.quantized
        params = sum(t.numel for t in self.tensors)
        qparams = sum(t.numel for t in q)
        # each shard holds the shared tables its own tensors use
        shared_bytes = sum(v.numel() * 4 for s in (self.shards or [self.tensors])
                           for v in self.shared_codebooks(s).values())
        out_bytes = sum(t.out_bytes() for t in self.tensors) + shared_bytes
        qbits = sum(t.out_bytes() * 8 for t in q)
        return {
            "tensors": len(self.tensors), "quantized_tensors": len(q), "params": params, "quantized_params": qparams,
            "bytes_in": sum(t.in_bytes() for t in self.tensors), "bytes_out": out_bytes,
            # bits of the quantized tensors (codes + scales + own codebooks) per quantized parameter
            "bits_per_param_quantized": round(qbits / qparams, 4) if qparams else None,
            # every stored bit (dense tensors at their width, shared tables too) per parameter
            "bits_per_param_model": round(out_bytes * 8 / params, 4),
            "shards": len(self.shards),
        }


def codebook_key(dtype: str, bits: int) -> str:
    return f"kbit.codebook.{dtype}{bits}"


# Candidate scales per block when the recipe leaves scale_search unset. Data-free: plain absmax, because the
# unweighted search lowers tensor error but raised SmolLM2's loss (issue 8). With calibration data the
# candidates are weighted by input importance (E[x^2]), which measured better than absmax on every model.
DATA_FREE_SEARCH = 1
CALIBRATED_SEARCH = 8


def auto_search(settings: dict, calibrated: bool) -> int:
    if settings.get("scale_search") is not None:
        return settings["scale_search"]
    return CALIBRATED_SEARCH if calibrated else DATA_FREE_SEARCH


def refit_refused(settings: dict, calibrated: bool) -> bool:
    """scale_refit asked for where it does not apply: with calibration or a method other than rtn."""
    return bool(settings.get("scale_refit")) and (calibrated or (settings.get("method") or "rtn") != "rtn")


def auto_refit(settings: dict, calibrated: bool, name: str) -> bool:
    """Least-squares scale refit (core/scale_search.refit_scales), for data-free round-to-nearest only (calibrated
    quantizers fit their scales to the inputs). Off unless asked for: it lowered KL to dense on every model and
    text measured (0.92-0.98x bitsandbytes) but raised SmolLM2-135M's ΔNLL on TinyStories by 25%, and the data-free
    default must not lose to bitsandbytes' absmax on the model's loss (issue 8; docs/CALIBRATION.md)."""
    if refit_refused(settings, calibrated):
        raise bad_input(f"tensor {name!r}: scale_refit applies to data-free round-to-nearest; with --calib or "
                        "--method gptq the scales are fitted to the calibration data (drop scale_refit)")
    return bool(settings.get("scale_refit"))


def _resolve(settings: dict, name: str, shape, calibrated: bool = False) -> tuple[Spec, int | str]:
    block = settings["block_size"]
    values = resolve_block(block, shape)
    numel = math.prod(shape)
    if values > numel:
        raise bad_input(
            f"block_size {block} does not fit tensor {name!r} ({numel} values, shape {list(shape)}); "
            f"use a block of at most {numel} values or 'tensor' (override it with --override '{name}=block_size:tensor')"
        )
    method = settings.get("method") or "rtn"
    if method == "gptq" and not calibrated:
        raise bad_input(f"tensor {name!r}: method gptq needs calibration data; add --calib FILE (text the model "
                        "knows), or use --method rtn")
    spec = Spec(settings["bits"], values, settings["dtype"], settings["double_quant"], settings["scale_dtype"],
                auto_search(settings, calibrated), method, auto_refit(settings, calibrated, name))
    return spec, block


def make_plan(names_infos, recipe: Recipe, max_shard_bytes: int | None = None, calibrated: bool = False) -> Plan:
    """names_infos: ordered (name, torch dtype, shape). Raises KbitError before any work on a bad recipe.
    calibrated: calibration data is given (decides the default scale search; gptq needs it)."""
    items = list(names_infos)
    used: dict[str, int] = {}
    all_patterns = [("targets", p) for p in (recipe.targets or [])] + [("ignore", p) for p in recipe.ignore]
    all_patterns += [("overrides", o.pattern) for o in recipe.overrides]
    for kind, p in all_patterns:
        used[f"{kind}\0{p}"] = 0

    plans = []
    for name, dtype, shape in items:
        is_float = dtype.is_floating_point
        # 1-D tensors (norms, biases) are never quantized; nor is an empty tensor (nothing to scale): copied dense
        quantizable = is_float and len(shape) >= 2 and math.prod(shape) > 0
        if recipe.targets is None:
            targeted, rule = quantizable and is_default_target(name, shape, is_float), "default"
        else:
            hits = [p for p in recipe.targets if matches(p, name)]
            for p in hits:
                used[f"targets\0{p}"] += quantizable
            targeted, rule = bool(hits) and quantizable, "targets"
        settings = recipe.settings()
        ignored = None
        for p in recipe.ignore:
            if matches(p, name):
                used[f"ignore\0{p}"] += 1
                ignored = ignored or p
                if targeted:
                    targeted, rule = False, f"ignore {p}"
        for o in recipe.overrides:
            # overrides act on quantizable tensors only: 're:.*down_proj.*' must not trip over a bias
            if quantizable and matches(o.pattern, name):
                used[f"overrides\0{o.pattern}"] += 1
                if ignored is not None:  # `ignore` means dense, whatever a broad override pattern says
                    targeted, rule = False, f"ignore {ignored}"
                    continue
                if o.settings.get("skip"):
                    targeted, rule = False, f"override {o.pattern}"
                    continue
                settings = {**settings, **o.settings}
                targeted, rule = True, f"override {o.pattern}"
        if targeted:
            spec, label = _resolve(settings, name, shape, calibrated)
            plans.append(TensorPlan(name, tuple(shape), dtype, spec, rule, label))
        else:
            plans.append(TensorPlan(name, tuple(shape), dtype, None, rule if rule not in ("default", "targets") else "not a target"))

    for key, count in used.items():
        if count == 0:
            kind, p = key.split("\0", 1)
            what = "tensor" if kind == "ignore" else "quantizable (2-D floating-point) tensor"
            raise bad_input(
                f"{recipe.source}: {kind} pattern {p!r} matches no {what}; run `kbit inspect SRC` to list the names"
            )
    plan = Plan(plans, recipe)
    plan.shards = assign_shards(plans, max_shard_bytes)
    return plan


def assign_shards(plans: list[TensorPlan], max_bytes: int | None) -> list[list[TensorPlan]]:
    """Consecutive tensors fill a shard up to max_bytes; a tensor never straddles two shards."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in plans:
        b = t.out_bytes()
        if max_bytes and shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += b
    return shards


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (decimal units as Hugging Face uses them)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise bad_input(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(value * units[unit])
