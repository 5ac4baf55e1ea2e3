"""Fold a LoRA adapter into its k-bit base: W' = dequantize(W) + scaling * B @ A, for every adapted weight.

- dense: W' is written in the asked dtype (or each tensor's original one) as a standard safetensors
  checkpoint, streamed tensor by tensor, like `kbit decode`.
- kbit: the merged dense checkpoint is written to a temporary folder and re-encoded with the base's own
  plan: every tensor the base stored in k bits is quantized again with its own bits, block size, data type,
  double quant, scale dtype and scale search (a recipe of exact per-tensor overrides rebuilt from the base's manifest, or
  from its file metadata when there is no manifest); everything the base kept dense stays dense.

Both record the lineage in kbit_manifest.json: the base (path, sha256 of its files), the adapter (path,
sha256), the training steps, and the base's own lineage before it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

from kbitcli.errors import bad_input
from kbitcli.finetune.peft_io import WEIGHTS, read_adapter, scaling_of
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.io import manifest as manifests
from kbitcli.io.dtypes import parse_float
from kbitcli.io.manifest import MANIFEST, sha256_file
from kbitcli.io.writer import FolderWriter, PlannedTensor, shard_names
from kbitcli.plan import assign_shards, parse_size
from kbitcli.recipes import Override, Recipe


def weight_deltas(adapter_dir: str) -> dict[str, torch.Tensor]:
    """{tensor name: fp32 delta in the tensor's stored orientation} of a PEFT LoRA folder."""
    config, pairs = read_adapter(adapter_dir)
    s = scaling_of(config)
    out = {}
    for module, (a, b) in pairs.items():
        d = (b.float() @ a.float()) * s
        out[f"{module}.weight"] = d.t().contiguous() if config.get("fan_in_fan_out") else d
    return out


def base_record(ck: KbitCheckpoint) -> dict:
    if ck.manifest and ck.manifest.get("outputs"):
        files = [{"name": r["name"], "sha256": r["sha256"]} for r in ck.manifest["outputs"]]
    else:
        files = [{"name": os.path.basename(f), "sha256": sha256_file(f)} for f in ck.files]
    rec = {"path": os.path.abspath(ck.path), "files": files}
    if ck.manifest and ck.manifest.get("source"):
        rec["encoded_from"] = ck.manifest["source"].get("path")
    return rec


def lineage_for(ck: KbitCheckpoint, adapter_dir: str, mode: str, training: dict) -> list:
    entry = {"op": "kbit finetune", "merge": mode, "base": base_record(ck),
             "adapter": {"path": os.path.abspath(adapter_dir), "sha256": sha256_file(os.path.join(adapter_dir, WEIGHTS))},
             **training}
    return list((ck.manifest or {}).get("lineage") or []) + [entry]


def write_dense(ck: KbitCheckpoint, deltas: dict, dst: str, dtype: str | None, lineage: list, force: bool = True,
                max_shard_size: str = "5GB") -> dict:
    missing = sorted(set(deltas) - set(ck.names))
    if missing:
        raise bad_input(f"adapter weight {missing[0]!r} is not in the base {ck.path}; was it trained on another model?")
    want = parse_float(dtype, "--merge-dtype")
    entries = []
    for n in ck.names:
        od = ck.orig_dtype(n)
        entries.append(PlannedTensor(n, want if (want is not None and od.is_floating_point) else od, ck.shape(n)))
    shards = assign_shards(entries, parse_size(max_shard_size))
    names = shard_names(len(shards))
    with FolderWriter(dst, folder=True, force=force) as out:
        for shard, fname in zip(shards, names):
            with out.shard(fname, [(e.name, e.dtype, e.shape) for e in shard]) as pf:
                for e in shard:
                    t = ck.tensor(e.name, torch.float32 if e.name in deltas else e.dtype).reshape(e.shape)
                    if e.name in deltas:
                        t = t + deltas[e.name]
                    pf.put(e.name, t.to(e.dtype))
        cfg = {k: v for k, v in (ck.config or {}).items() if k != "quantization_config"}
        if want is not None:
            cfg["torch_dtype"] = str(want).removeprefix("torch.")
        manifest = manifests.build("dense", ck.path, [], None, kind="dense (merged)", dtype=dtype or "original",
                                   lineage=lineage)
        manifest["source"] = {"path": None, "merged": "dequantized base + LoRA adapter; see lineage"}
        out.finish(config=cfg, side_files=ck.path, manifest=manifest)
    return {"path": dst, "tensors": len(entries), "merged": len(deltas)}


def base_recipe(ck: KbitCheckpoint) -> Recipe:
    """The base's own plan as a recipe: exactly its quantized tensors, each with its own settings."""
    plan = {t["name"]: t for t in (ck.manifest or {}).get("tensors", []) if t.get("quantized")}
    overrides, targets = [], []
    for n in ck.names:
        if not ck.is_quantized(n):
            continue
        m = ck.meta[n]
        p = plan.get(n, {})
        settings = {"bits": m["bits"], "block_size": p.get("block_size", m["block_size"]), "dtype": m["dtype"],
                    "double_quant": m["double_quant"], "scale_dtype": m["scale_dtype"],
                    # checkpoints from before scale search existed used plain absmax scales
                    "scale_search": m.get("scale_search") or 1,
                    # and, from before the scale refit, plain absmax scales
                    "scale_refit": bool(m.get("scale_refit", False))}
        pattern = "re:" + re.escape(n)
        targets.append(pattern)
        overrides.append(Override(pattern, settings))
    if not targets:
        raise bad_input(f"{ck.path}: has no quantized tensors to re-encode")
    return Recipe(targets=targets, overrides=overrides, source=f"plan of {ck.path}")


def write_kbit(ck: KbitCheckpoint, deltas: dict, dst: str, lineage: list, force: bool = True, progress=None) -> dict:
    from kbitcli.encode import encode

    parent = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=".merge-dense-", dir=parent)
    try:
        dense = os.path.join(tmp, "dense")
        write_dense(ck, deltas, dense, None, lineage, force=True)
        result = encode(dense, dst, base_recipe(ck), force=force, lineage=lineage, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the encoder recorded the temporary folder as its source; the truth is the base + adapter (lineage)
    man_path = os.path.join(dst, MANIFEST)
    with open(man_path) as fh:
        manifest = json.load(fh)
    manifest["source"] = {"path": None, "merged": "dequantized base + LoRA adapter; see lineage"}
    from kbitcli.io.atomic import write_json

    write_json(man_path, manifest)
    return {"path": dst, "tensors": result["tensors"], "quantized_tensors": result["quantized_tensors"],
            "bits_per_param_quantized": result["bits_per_param_quantized"], "merged": len(deltas)}


def merge(base_path: str, adapter_dir: str, dst: str, mode: str, *, dtype: str | None = None, training: dict | None = None,
          force: bool = True, progress=None) -> dict:
    if mode not in ("kbit", "dense"):
        raise bad_input(f"--merge {mode!r}: choose kbit or dense")
    ck = KbitCheckpoint(base_path)
    deltas = weight_deltas(adapter_dir)
    lineage = lineage_for(ck, adapter_dir, mode, training or {})
    if mode == "dense":
        return write_dense(ck, deltas, dst, dtype, lineage, force=force)
    return write_kbit(ck, deltas, dst, lineage, force=force, progress=progress)
