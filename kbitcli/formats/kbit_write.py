"""Writing the native k-bit format (docs/FORMAT.md): the plan's tensors quantized and streamed into shards.

Every output file's header is known before any work (shard_layout), so tensors are written straight to their
offsets as they are quantized, a few at once (kbitcli/parallel.py), in plan order. With calibration, the
model first runs block by block (calibration/sequential.py) and GPTQ / weighted-RTN tensors wait in a spill
on disk until their turn.
"""

from __future__ import annotations

import contextlib

import torch

from kbitcli.core.blockwise import quantize
from kbitcli.formats.kbit_format import FORMAT_VERSION, file_metadata, tensor_meta
from kbitcli.formats.source import Source
from kbitcli.io import manifest as manifests
from kbitcli.io.manifest import hash_in_background
from kbitcli.io.safetensors_stream import planned_file_size
from kbitcli.io.spill import Spill, spill_for
from kbitcli.io.writer import FolderWriter, shard_names
from kbitcli.parallel import default_workers, ordered_map, single_threaded_torch
from kbitcli.plan import Plan

QUANT_METHOD = "kbit"


def quantization_config(plan: Plan) -> dict:
    r = plan.recipe
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": r.bits, "block_size": r.block_size,
            "dtype": r.dtype, "double_quant": r.double_quant, "method": r.method,
            "quantized_tensors": len(plan.quantized), "bits_per_param": plan.summary()["bits_per_param_quantized"]}


def shard_layout(plan: Plan, shard: list) -> tuple[dict, list, dict]:
    """What one output file holds, known before any work: (shared tables, (key, dtype, shape) entries, metadata)."""
    used = plan.shared_codebooks(shard)
    entries = [e for t in shard for e in t.outputs()] + [(k, torch.float32, tuple(v.shape)) for k, v in used.items()]
    return used, entries, file_metadata({t.name: tensor_meta(t) for t in shard if t.quantized})


def encode_tensor(src: Source, t, spill=None) -> dict[str, torch.Tensor]:
    """Read one planned tensor and produce its output tensors: output key -> tensor. A tensor calibration
    already quantized (GPTQ / weighted RTN) comes from the spill."""
    if spill is not None and t.name in spill:
        qt = spill.get(t.name)
    else:
        w = src.get(t.name)
        if not t.quantized:
            return {t.name: w}
        qt = quantize(w, t.spec, t.name)
    parts = {"codes": qt.codes, "scales": qt.scales, "codebook": qt.codebook,
             "scales_absmax": qt.scales_absmax, "scales_offset": qt.scales_offset}
    return {key: parts[key[len(t.name) + 1:]] for key, _, _ in t.outputs()}


def export(src: Source, src_path: str, dst: str, plan: Plan, recipe, recipe_info: dict, *, force: bool,
           dry_run: bool, progress, max_shard_bytes=None, calib=None, lineage: list | None = None,
           prequantized: dict | None = None) -> dict:
    """prequantized: name -> QuantizedTensor already made (the Python API's save of a k-bit module): written
    as it is."""
    summary = plan.summary()
    layouts = [shard_layout(plan, shard) for shard in plan.shards]
    # the exact bytes of the files a real encode writes (headers included): --dry-run reports the same number
    summary["bytes_out"] = sum(planned_file_size(entries, md) for _, entries, md in layouts)
    result = {"source": src_path, "destination": dst, "dry_run": dry_run, **summary,
              "plan": [t.as_dict() for t in plan.tensors], "recipe": recipe_info}
    if dry_run:
        return result
    folder = src.is_folder  # a folder gives a folder (shards, config, tokenizer); a file gives a file
    workers = default_workers()
    names = shard_names(len(plan.shards))
    with FolderWriter(dst, folder=folder, force=force) as out, spill_for(calib, dst, Spill) as spill:
        calibration = None
        if calib is not None:
            from kbitcli.calibration import sequential

            calibration = sequential.run(src, src_path, plan, calib, spill, progress)
            result["calibration"] = calibration
        for f in src.files:  # the manifest's sha256 of the input, computed while we quantize
            hash_in_background(f)
        progress.start("encode", summary["bytes_in"], summary["tensors"])
        for shard, fname, (used, entries, metadata) in zip(plan.shards, names, layouts):
            with out.shard(fname, entries, metadata, shared=tuple(used)) as pf:
                for k, v in used.items():
                    pf.put(k, v)
                # a few tensors at once, one thread each (see kbitcli/parallel.py); written here, in order
                with single_threaded_torch() if workers > 1 else contextlib.nullcontext():
                    ready = spill if spill is not None else prequantized
                    for t, outputs in ordered_map(lambda t: encode_tensor(src, t, ready), shard, workers):
                        for key, value in outputs.items():
                            pf.put(key, value)
                        progress.advance(t.name, t.in_bytes())
            hash_in_background(out.paths[-1])
        progress.stop()
        manifest = manifests.build("kbit", src_path, src.files, recipe_info, format_version=FORMAT_VERSION,
                                   summary=summary, tensors=result["plan"], lineage=lineage or [],
                                   calibration=calibration)
        config = None if src.config is None else {**src.config, "quantization_config": quantization_config(plan)}
        records = out.finish(config=config, write_side_files=src.write_side_files if folder else None,
                             index_metadata={"format": "kbit"}, manifest=manifest)
    result["files"] = [r["name"] for r in records]
    return result
