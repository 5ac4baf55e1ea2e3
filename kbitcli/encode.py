"""encode: dense checkpoint -> k-bit checkpoint (native or another engine's format). Open, plan every tensor (so
--dry-run and every error come before any work), then the format's writer streams tensor by tensor."""

from __future__ import annotations

import os
import time

from kbitcli.errors import bad_input
from kbitcli.formats.registry import detect, refuse_quantized_keys, writer
from kbitcli.formats.source import Source, open_source
from kbitcli.io.atomic import check_destination
from kbitcli.io.folder import weight_files
from kbitcli.plan import Plan, make_plan, parse_size
from kbitcli.progress import NullProgress
from kbitcli.recipes import Recipe, recipe_record

DEFAULT_SHARD = "5GB"


def refuse_quantized(src: Source) -> None:
    """An already quantized input would be quantized twice: refuse it, naming what was found (detect() is the
    one judge of what a checkpoint holds)."""
    fmt = detect(src.path)  # refuses layouts kbit does not read (GPTQ qweight, other quant_methods) itself
    refuse_quantized_keys(src.path, src.names)  # .bin checkpoints: detect() reads no pickle
    if fmt == "kbit" or any(n.endswith(".codes") for n in src.names):
        raise bad_input(f"{src.path} is already a kbit checkpoint; encode the original, or `kbit decode` it first")
    if fmt != "dense":
        raise bad_input(f"{src.path} is already quantized ({fmt}); `kbit decode` it to a dense checkpoint first")
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


def _check_dst(dst: str, src_path: str, force: bool, recipe: Recipe | None = None, calib=None) -> None:
    from kbitcli.io.atomic import check_not_overlapping

    others = [("--calib", calib.path if calib is not None else None),
              ("--recipe", recipe.source if recipe is not None and os.path.isfile(recipe.source) else None)]
    check_not_overlapping(dst, [src_path, *others])  # first: --force must not be suggested when it would be refused
    check_destination(dst, force, folder=os.path.isdir(src_path))  # a file SRC gives a file: `DST/` is refused


def encode(src_path: str, dst: str, recipe: Recipe | None = None, *, max_shard_size: str | int | None = DEFAULT_SHARD,
           force: bool = False, dry_run: bool = False, progress=None, lineage: list | None = None,
           fmt: str = "kbit", gguf_type: str | None = None, calib=None) -> dict:
    """Encode src_path into dst: open -> plan -> write. Returns the summary dict that `--json` prints.

    fmt: "kbit" (native), or "bnb" / "compressed-tensors" / "gguf" to write a format other engines load
    (formats/registry.py WRITERS; each refuses up front what it cannot hold).

    calib: a calibration.data.Calibration: the model runs block by block on that text first (sequential
    calibration), and each quantized tensor's codes come from GPTQ or importance-weighted round-to-nearest.
    """
    t0 = time.time()
    recipe = recipe or Recipe()
    progress = progress or NullProgress()
    out = writer(fmt)
    src = open_source(src_path)
    if gguf_type is not None and fmt != "gguf":
        raise bad_input(f"--gguf-type {gguf_type} goes with --format gguf, not --format {fmt}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    # a file gives one file: shards exist only in a folder (several shards would overwrite each other)
    plan = plan_source(src, recipe, limit if src.is_folder else None, calibrated=calib is not None)
    check_calibration(src, calib)
    options = {"gguf_type": gguf_type} if fmt == "gguf" else {"lineage": lineage} if fmt == "kbit" else {}
    if calib is not None:  # the format quantizes on its own grid during the calibration run
        options["calib"] = calib
    if not dry_run:
        _check_dst(dst, src_path, force, recipe, calib)
    result = out.export(src, src_path, dst, plan, recipe, recipe_record(recipe), force=force, dry_run=dry_run,
                        progress=progress, max_shard_bytes=limit, **options)
    if dry_run:
        check_values(src, plan, progress)
    else:  # what `kbit inspect` counts: the weight files as written (headers, metadata, shared tables included)
        files = [dst] if os.path.isfile(dst) else weight_files(dst, pickles=False)
        result["bytes_out"] = sum(os.path.getsize(f) for f in files)
    if result.get("params"):
        result["bits_per_param_model"] = round(result["bytes_out"] * 8 / result["params"], 4)
    result["seconds"] = round(time.time() - t0, 3)
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
