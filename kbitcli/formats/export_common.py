"""What the foreign exports (`kbit encode --format bnb | compressed-tensors | gguf`) share.

Each format module (formats/bnb.py, formats/compressed_tensors.py, formats/gguf_format.py) checks the plan
against what its format can hold and refuses up front, before anything is written, naming the tensor and the
nearest setting it can hold; then it streams tensor by tensor. This module holds the common parts: the
refusal message, the result/plan dict the CLI prints, the manifest record, and streaming items through the one
folder writer (io/writer.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kbitcli.errors import bad_input
from kbitcli.io import manifest as manifests
from kbitcli.io.manifest import MANIFEST
from kbitcli.io.safetensors_stream import nbytes
from kbitcli.io.writer import FolderWriter, shard_names
from kbitcli.plan import Plan, TensorPlan, assign_shards

def module_glob(name: str) -> str:
    """'model.layers.3.mlp.down_proj.weight' -> 'model.layers.*.mlp.down_proj' (for a suggested --override)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    return re.sub(r"\.\d+(?=\.|$)", ".*", module)


def who(t: TensorPlan, recipe, key: str) -> str:
    """Who asked for setting `key` of tensor t, with the verb: the recipe/flags, or the override rule that set it."""
    pattern = t.rule[len("override "):] if t.rule.startswith("override") else None
    if pattern is not None and any(o.pattern == pattern and key in o.settings for o in recipe.overrides):
        return f"--override {pattern!r} asks"
    return "the recipe/flags ask"


def refit_problem(t: TensorPlan, recipe, label: str):
    """A format whose own rounding sets its scales cannot take kbit's scale refit: refused (it is on only where
    the recipe, a flag or an override asks for it), never dropped silently."""
    if t.spec.scale_refit:
        return (f"{label} scales come from its own rounding, so kbit's scale refit does not apply, and "
                f"{who(t, recipe, 'scale_refit')} for it", fix(t, recipe, "scale_refit", "false", "--no-scale-refit"))
    return None


def fix(t: TensorPlan, recipe, key: str, value, flag: str) -> str:
    """The nearest setting, said where it has to change: the flag, or the override rule that set it."""
    pattern = t.rule[len("override "):] if t.rule.startswith("override") else None
    if pattern is not None and any(o.pattern == pattern and key in o.settings for o in recipe.overrides):
        return f"{key}:{value} in --override {pattern!r}"
    return flag


def refuse(fmt: str, problems: list[tuple[str, str]]) -> None:
    """problems: (what is wrong, the nearest setting that works). One line: every distinct problem (first few),
    then the combined nearest settings; raised before anything is written."""
    if not problems:
        return
    texts = list(dict.fromkeys(p for p, _ in problems))
    fixes = list(dict.fromkeys(f for _, f in problems if f))
    shown = "; ".join(texts[:3]) + (f" (and {len(texts) - 3} more)" if len(texts) > 3 else "")
    sep = " " if all(f.startswith("--") for f in fixes) else ", "
    nearest = f"; nearest: {sep.join(fixes[:4])}" if fixes else ""
    raise bad_input(f"--format {fmt}: {shown}{nearest}; nothing was written")


def require_folder(src, fmt: str) -> None:
    if not src.is_folder or src.config is None:
        raise bad_input(f"{src.path}: --format {fmt} writes a model that transformers/vLLM/llama.cpp load, which "
                        "needs the architecture: give a model folder with config.json, not a bare weights file")


# ---- what gets written, and the summary the CLI prints ----------------------------------------------

@dataclass
class Item:
    """One source tensor as the format stores it: its entries (key, dtype, shape) and a label for the plan."""

    plan: TensorPlan
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    kind: str  # e.g. "nf4", "int4 g64", "Q4_0", or the dense dtype
    extra: dict = field(default_factory=dict)  # what the writer needs to know about this tensor
    row: dict = field(default_factory=dict)  # extra columns for the printed plan

    def out_bytes(self) -> int:
        return sum(nbytes(dt, shape) for _, dt, shape in self.entries)

    def in_bytes(self) -> int:
        return self.plan.in_bytes()

    @property
    def name(self) -> str:
        return self.plan.name


def result_dict(fmt: str, src_path: str, dst: str, dry_run: bool, plan: Plan, items: list[Item], recipe_info: dict,
                shards: int = 1, notes: list[str] | None = None, out_bytes: int | None = None) -> dict:
    params = sum(i.plan.numel for i in items)
    q = [i for i in items if i.plan.quantized]
    qparams = sum(i.plan.numel for i in q)
    bytes_out = out_bytes if out_bytes is not None else sum(i.out_bytes() for i in items)
    rows = []
    for i in items:
        row = i.plan.as_dict()
        row.update(bytes_out=i.out_bytes(), bits_per_param=round(i.out_bytes() * 8 / i.plan.numel, 4), **i.row)
        if i.plan.quantized:
            row["data_type"] = i.kind
        else:
            row["dtype"] = i.kind
        rows.append(row)
    return {"source": src_path, "destination": dst, "dry_run": dry_run, "format": fmt,
            "tensors": len(items), "quantized_tensors": len(q), "params": params, "quantized_params": qparams,
            "bytes_in": sum(i.in_bytes() for i in items), "bytes_out": bytes_out,
            "bits_per_param_quantized": round(sum(i.out_bytes() for i in q) * 8 / qparams, 4) if qparams else None,
            "bits_per_param_model": round(bytes_out * 8 / params, 4), "shards": shards,
            "notes": notes or [], "plan": rows, "recipe": recipe_info}


def manifest(fmt: str, src, recipe_info: dict, result: dict) -> dict:
    """The manifest's record; `calibration` is the sequential run's record (None for a data-free export),
    as the native format's manifest has it."""
    return manifests.build(fmt, src.path, src.files, recipe_info, tensors=result["plan"], notes=result["notes"],
                           calibration=result.get("calibration"))


def write_hf_folder(src, dst: str, items: list[Item], produce, config: dict, *, force: bool, max_shard_bytes,
                    progress, meta: dict) -> list[str]:
    """Stream items into safetensors shards under dst (all-or-nothing): produce(item) -> {key: tensor} gives
    exactly item.entries. Writes the index (if sharded), config.json, the source's tokenizer/side files and
    a kbit_manifest.json recording how it was made. Returns the written file names."""
    shards = assign_shards(items, max_shard_bytes)
    with FolderWriter(dst, folder=True, force=force) as out:
        progress.start("export", sum(i.in_bytes() for i in items), len(items))
        for shard, fname in zip(shards, shard_names(len(shards))):
            with out.shard(fname, [e for i in shard for e in i.entries]) as pf:
                for i in shard:
                    tensors = produce(i)
                    for key, _, _ in i.entries:
                        pf.put(key, tensors[key])
                    progress.advance(i.name, i.in_bytes())
        progress.stop()
        records = out.finish(config=config, side_files=src.path if src.is_folder else None, manifest=dict(meta))
    return [r["name"] for r in records] + [MANIFEST]


def source_dtype_name(src) -> str:
    """The model's dtype as config.json names it (transformers 5 writes `dtype`, 4.x `torch_dtype`)."""
    cfg = src.config or {}
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and name in ("float32", "float16", "bfloat16"):
        return name
    dtypes = {src.info(n)[0] for n in src.names}
    floats = [d for d in dtypes if d.is_floating_point]
    return str(floats[0]).removeprefix("torch.") if len(floats) == 1 else "float32"


# ---- calibrated exports (--method gptq / rtn with --calib) ----------------------------------------------

def calibrate(src, src_path: str, plan, calib, spill, progress, quantizer, fmt: str) -> dict | None:
    """Run the model block by block on the calibration text (calibration/sequential.py), quantizing every
    target with quantizer(w, t, H, n, calib) -> ({part: tensor} for the spill, dequantized fp32 weight) on the
    format's own grid. Returns the calibration record for the manifest (None without calib)."""
    if calib is None:
        return None
    from kbitcli.calibration import sequential

    if getattr(calib, "asymmetric", False):
        raise bad_input(f"--format {fmt}: asymmetric (GPTAQ) calibration is written by the native format only; "
                        "use --format kbit, or symmetric calibration")
    return sequential.run(src, src_path, plan, calib, spill, progress, quantizer=quantizer)
