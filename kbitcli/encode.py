"""encode: dense checkpoint -> native k-bit checkpoint. Plan everything, then stream tensor by tensor."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time

import torch

from kbitcli import __version__
from kbitcli.calibration.spill import Spill, spill_for
from kbitcli.core.blockwise import quantize
from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import FORMAT_VERSION, MANIFEST, file_metadata, shard_names, tensor_meta
from kbitcli.formats.output import AtomicOutput, check_destination, file_record, hash_in_background, folder_records
from kbitcli.formats.safetensors_stream import PlannedFile, planned_file_size
from kbitcli.formats.source import Source, copy_side_files, open_source
from kbitcli.parallel import default_workers, ordered_map, single_threaded_torch
from kbitcli.plan import Plan, make_plan, parse_size
from kbitcli.progress import NullProgress
from kbitcli.recipes import Recipe

DEFAULT_SHARD = "5GB"
QUANT_METHOD = "kbit"


def refuse_quantized(src: Source) -> None:
    """An already quantized input would be quantized twice: refuse it, naming what was found."""
    if src.metadata.get("format") == "kbit" or any(n.endswith(".codes") for n in src.names):
        raise bad_input(f"{src.path} is already a kbit checkpoint; encode the original, or `kbit decode` it first")
    if any(n.endswith((".absmax", ".quant_map", "weight_packed", ".qweight")) or ".quant_state." in n for n in src.names):
        raise bad_input(f"{src.path} is already quantized (bitsandbytes / compressed-tensors / GPTQ keys); "
                        "`kbit decode` it to a dense checkpoint first")
    qc = (src.config or {}).get("quantization_config")
    if qc:
        raise bad_input(f"{src.path}/config.json has a quantization_config ({qc.get('quant_method', '?')}); "
                        "encode the original dense model")


def plan_source(src: Source, recipe: Recipe, max_shard_size: str | int | None = DEFAULT_SHARD,
                calibrated: bool = False) -> Plan:
    refuse_quantized(src)
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    return make_plan(((n, *src.info(n)) for n in src.names), recipe, limit, calibrated)


def check_calibration(src: Source, calib) -> None:
    """Calibration runs the model: it needs a model folder (config.json, tokenizer) and a readable text."""
    if calib is None:
        return
    if not src.is_folder:
        raise bad_input(f"{src.path}: calibration (--calib, --method gptq) runs the model, and a bare weights file "
                        "has none; point SRC at the model folder (config.json, tokenizer), or use --method rtn "
                        "without --calib")
    if src.config is None:
        raise bad_input(f"{src.path}: no config.json, so the model cannot run for calibration; add it, or use "
                        "--method rtn without --calib")
    calib.check()


def recipe_dict(recipe: Recipe) -> dict:
    return {**recipe.settings(), "targets": recipe.targets, "ignore": recipe.ignore,
            "overrides": [{"pattern": o.pattern, **o.settings} for o in recipe.overrides], "source": recipe.source}


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


def _check_dst(dst: str, src_path: str, force: bool, recipe: Recipe | None = None, calib=None) -> None:
    from kbitcli.formats.output import check_not_overlapping

    others = [("--calib", calib.path if calib is not None else None),
              ("--recipe", recipe.source if recipe is not None and os.path.isfile(recipe.source) else None)]
    check_not_overlapping(dst, [src_path, *others])  # first: --force must not be suggested when it would be refused
    check_destination(dst, force, folder=os.path.isdir(src_path))  # a file SRC gives a file: `DST/` is refused


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


def encode(src_path: str, dst: str, recipe: Recipe | None = None, *, max_shard_size: str | int | None = DEFAULT_SHARD,
           force: bool = False, dry_run: bool = False, progress=None, lineage: list | None = None,
           fmt: str = "kbit", gguf_type: str | None = None, calib=None) -> dict:
    """Encode src_path into dst. Returns the summary dict that `--json` prints.

    fmt: "kbit" (native), or "bnb" / "compressed-tensors" / "gguf" to write a format other engines load
    (kbitcli/formats/export_common.py; each refuses up front what it cannot hold).

    calib: a calibration.data.Calibration: the model runs block by block on that text first (sequential
    calibration), and each quantized tensor's codes come from GPTQ or importance-weighted round-to-nearest.
    """
    t0 = time.time()
    recipe = recipe or Recipe()
    progress = progress or NullProgress()
    src = open_source(src_path)
    if gguf_type is not None and fmt != "gguf":
        raise bad_input(f"--gguf-type {gguf_type} goes with --format gguf, not --format {fmt}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    # a file gives one file: shards exist only in a folder (several shards would overwrite each other)
    plan = plan_source(src, recipe, limit if src.is_folder else None, calibrated=calib is not None)
    check_calibration(src, calib)
    if fmt != "kbit":
        from kbitcli.formats.export_common import format_module

        module = format_module(fmt)
        options = {"gguf_type": gguf_type} if fmt == "gguf" else {}
        if calib is not None:  # the format quantizes on its own grid during the calibration run
            import inspect

            if "calib" not in inspect.signature(module.export).parameters:
                raise bad_input(f"--format {fmt} does not take calibration yet (--calib, --method gptq); "
                                "use --format kbit, bnb or gguf, or leave out --calib")
            options["calib"] = calib
        if not dry_run:
            _check_dst(dst, src_path, force, recipe, calib)
        result = module.export(src, src_path, dst, plan, recipe, recipe_dict(recipe), force=force, dry_run=dry_run,
                               progress=progress, max_shard_bytes=limit, **options)
        if dry_run:
            check_values(src, plan, progress)
        result["seconds"] = round(time.time() - t0, 3)
        return result
    summary = plan.summary()
    layouts = [shard_layout(plan, shard) for shard in plan.shards]
    data_bytes = summary["bytes_out"]  # tensor bytes only, as the index's total_size counts them
    # the exact bytes of the files a real encode writes (headers included): --dry-run reports the same number
    summary["bytes_out"] = sum(planned_file_size(entries, md) for _, entries, md in layouts)
    result = {"source": src_path, "destination": dst, "dry_run": dry_run, **summary,
              "plan": [t.as_dict() for t in plan.tensors], "recipe": recipe_dict(recipe)}
    if dry_run:
        check_values(src, plan, progress)
        return result
    _check_dst(dst, src_path, force, recipe, calib)
    folder = src.is_folder  # a folder gives a folder (shards, config, tokenizer); a file gives a file
    workers = default_workers()
    names = shard_names(len(plan.shards))
    with AtomicOutput(dst, folder=folder, force=force) as out, spill_for(calib, dst, Spill) as spill:
        calibration = None
        if calib is not None:
            from kbitcli.calibration import sequential

            calibration = sequential.run(src, src_path, plan, calib, spill, progress)
            result["calibration"] = calibration
        files = []
        for f in src.files:  # the manifest's sha256 of the input, computed while we quantize
            hash_in_background(f)
        progress.start("encode", summary["bytes_in"], summary["tensors"])
        for shard, fname, (used, entries, metadata) in zip(plan.shards, names, layouts):
            path = os.path.join(out.tmp, fname) if folder else out.tmp
            pf = PlannedFile(path, entries, metadata)
            try:
                for k, v in used.items():
                    pf.put(k, v)
                # a few tensors at once, one thread each (see kbitcli/parallel.py); written here, in order
                with single_threaded_torch() if workers > 1 else contextlib.nullcontext():
                    for t, outputs in ordered_map(lambda t: encode_tensor(src, t, spill), shard, workers):
                        for key, value in outputs.items():
                            pf.put(key, value)
                        progress.advance(t.name, t.in_bytes())
                pf.close()
            finally:
                pf.abort()
            hash_in_background(path)
            files.append(path)
        progress.stop()
        root = out.tmp
        manifest = {"tool": "kbit", "version": __version__, "format_version": FORMAT_VERSION,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "source": {"path": os.path.abspath(src_path), "files": [file_record(f) for f in src.files]},
                    "recipe": recipe_dict(recipe), "summary": summary, "tensors": result["plan"],
                    "lineage": lineage or [], "calibration": calibration}
        if folder:
            if len(names) > 1:
                weight_map = {key: fname for shard, fname in zip(plan.shards, names) for t in shard for key, _, _ in t.outputs()}
                with open(os.path.join(out.tmp, "model.safetensors.index.json"), "w") as fh:
                    json.dump({"metadata": {"total_size": data_bytes, "format": "kbit"}, "weight_map": weight_map}, fh, indent=2)
            copy_side_files(src.path, out.tmp)
            if src.config is not None:
                with open(os.path.join(out.tmp, "config.json"), "w") as fh:
                    json.dump({**src.config, "quantization_config": quantization_config(plan)}, fh, indent=2)
            manifest["outputs"] = folder_records(root)
            man_path = os.path.join(out.tmp, MANIFEST)
        else:
            manifest["outputs"] = [{**file_record(out.tmp), "name": os.path.basename(dst)}]
            man_path = out.sidecar(dst + ".manifest.json")
        with open(man_path, "w") as fh:
            json.dump(manifest, fh, indent=2)
    result["bytes_out"] = sum(r["bytes"] for r in manifest["outputs"] if r["name"].endswith(".safetensors"))
    result["seconds"] = round(time.time() - t0, 3)
    result["files"] = [r["name"] for r in manifest["outputs"]]
    return result



def check_values(src: Source, plan: Plan, progress=None) -> None:
    """--dry-run: every check a real run makes on the values (NaN/Inf, scale overflow and underflow), by
    streaming each quantized tensor once; nothing is quantized or written."""
    from kbitcli.core.blockwise import check_tensor

    if progress is not None:
        progress.start("check", sum(t.in_bytes() for t in plan.quantized), len(plan.quantized))
    for t in plan.quantized:
        check_tensor(src.get(t.name), t.spec, t.name)
        if progress is not None:
            progress.advance(t.name, t.in_bytes())
    if progress is not None:
        progress.stop()
