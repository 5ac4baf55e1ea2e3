"""kbit encode SRC DST: quantize a dense checkpoint (flags override the recipe)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich import box
from rich.table import Table

from kbitcli.commands.common import ForceOpt, JsonOpt, QuietOpt, human_bytes, progress_for, run
from kbitcli.commands.options import (ActOrderOpt, BitsOpt, BlockSizeOpt, CalibOpt, CalibTokensOpt, DampOpt,
                                     DataTypeOpt, DoubleQuantOpt, IgnoreOpt, MethodOpt, OverrideOpt, RecipeOpt,
                                     RemovedDtypeOpt, ScaleDtypeOpt, ScaleRefitOpt, ScaleSearchOpt, SeedOpt, TargetsOpt,
                                     calibration_from_options)
from kbitcli.commands.tables import group_rows, natural_sorted, print_table
from kbitcli.encode import DEFAULT_SHARD, encode
from kbitcli.formats.registry import WRITERS
from kbitcli.recipes import Recipe, load_recipe, with_flags


def _settings_cells(p: dict) -> tuple[str, str, str, str, str]:
    """k, block, type, bits/param and rule cells of one plan row (a quantized or a dense tensor)."""
    if p["quantized"]:
        kind = p["data_type"] + ("+dq" if p["double_quant"] else "") + (" gptq" if p.get("method") == "gptq" else "")
        return str(p["bits"]), str(p["block_size"]), kind, "{:.3f}", p["rule"]
    return "-", "-", f"[dim]{p['dtype']}[/dim]", "{:.0f}", f"[dim]{p['rule']}[/dim]"


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def plan_table(result: dict, verbose: bool = False) -> Table:
    """The plan as a rich Table: one row per tensor role (`model.layers.*.mlp.down_proj.weight`, layers 0-29)
    and setting, or with verbose=True one row per tensor; names in natural order (layers.2 before layers.10)."""
    title = "plan" if result.get("dry_run") else "encoded"
    # no vertical rules: the grouped table of a Llama-style model fits a 120-column terminal unfolded
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              collapse_padding=True)
    cols = ("tensor", "shape", "k", "block", "type", "bits/param", "rule") if verbose else \
        ("tensor", "layers", "count", "shape", "k", "block", "type", "bits/param", "rule")
    for col in cols:
        # names are never cut: print_table makes a log as wide as the longest row, a terminal folds them
        t.add_column(col, justify="right" if col in ("k", "count", "bits/param") else "left",
                     overflow="fold" if col == "tensor" else "ellipsis", no_wrap=col != "tensor")
    if verbose:
        for p in natural_sorted(result["plan"]):
            k, block, kind, fmt, rule = _settings_cells(p)
            name = p["name"] if p["quantized"] else f"[dim]{p['name']}[/dim]"
            t.add_row(name, _shape(p["shape"]), k, block, kind, fmt.format(p["bits_per_param"]), rule)
        return t
    for g in group_rows(result["plan"]):
        k, block, kind, fmt, rule = _settings_cells(g.first)
        shapes = g.shapes
        shape = ", ".join(_shape(s) for s in shapes[:3]) + (f", … ({len(shapes)} shapes)" if len(shapes) > 3 else "")
        name = g.name if g.first["quantized"] else f"[dim]{g.name}[/dim]"
        t.add_row(name, g.layers, str(g.count), shape, k, block, kind, fmt.format(g.bits_per_param()), rule)
    return t


def show_plan(result: dict, con, verbose: bool = False) -> None:
    groups = len(group_rows(result["plan"]))
    print_table(con, plan_table(result, verbose))
    # elsewhere than a terminal (a CI log) each message stays one line, as each table row does
    soft = not con.is_terminal
    if not verbose and groups < len(result["plan"]):
        con.print(f"[dim]{len(result['plan'])} tensors in {groups} rows; --verbose lists every tensor, "
                  "--json the full plan[/dim]", soft_wrap=soft)
    q = result.get("bits_per_param_quantized")
    con.print(f"{result['quantized_tensors']}/{result['tensors']} tensors quantized, "
              f"{result['quantized_params']:,}/{result['params']:,} params; "
              f"bits/param: {q if q is not None else '-'} (quantized), {result['bits_per_param_model']} (whole model); "
              f"{human_bytes(result['bytes_in'])} -> {human_bytes(result['bytes_out'])}"
              + (f" in {result['seconds']} s" if "seconds" in result else "")
              + (" [bold](dry run: nothing written)[/bold]" if result.get("dry_run") else f" -> {result['destination']}"), soft_wrap=soft)
    cal = result.get("calibration")
    if cal:
        con.print(f"calibrated on {cal['tokens_used']:,} tokens of {cal['file']} (seed {cal['seed']}) in {cal['seconds']} s; "
                  f"{cal['calibrated_tensors']} tensors calibrated"
                  + (f", {len(cal['uncalibrated'])} outside the model's blocks rounded without it" if cal["uncalibrated"] else ""), soft_wrap=soft)
    for note in result.get("notes", []):  # --format bnb/compressed-tensors/gguf: what the target format changes
        con.print(f"[yellow]note:[/yellow] {note}", soft_wrap=soft)


def encode_cmd(
    src: str = typer.Argument(..., help="Dense checkpoint: .safetensors/.bin file or Hugging Face model folder."),
    dst: str = typer.Argument(..., help="Output: a folder for a folder SRC, a file for a file SRC."),
    recipe: Optional[str] = RecipeOpt, bits: Optional[int] = BitsOpt, block_size: Optional[str] = BlockSizeOpt,
    data_type: Optional[str] = DataTypeOpt, double_quant: Optional[bool] = DoubleQuantOpt,
    scale_dtype: Optional[str] = ScaleDtypeOpt, scale_search: Optional[int] = ScaleSearchOpt,
    scale_refit: Optional[bool] = ScaleRefitOpt,
    method: Optional[str] = MethodOpt, calib: Optional[str] = CalibOpt, calib_tokens: Optional[int] = CalibTokensOpt,
    seed: int = SeedOpt, damp: Optional[float] = DampOpt, act_order: bool = ActOrderOpt,
    targets: Optional[List[str]] = TargetsOpt, ignore: Optional[List[str]] = IgnoreOpt,
    override: Optional[List[str]] = OverrideOpt,
    max_shard_size: str = typer.Option(DEFAULT_SHARD, "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (--verbose: per tensor) and sizes and run every check a real run makes (reads each tensor once for NaN/Inf and scale range); quantize and write nothing."),
    fmt: str = typer.Option("kbit", "--format", "-f", help="kbit | bnb | compressed-tensors | gguf (see docs/INTEROP.md)."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="With --format gguf: Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 (default: from --bits)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every tensor (default: one row per tensor role and setting, e.g. model.layers.*.mlp.down_proj.weight over layers 0-29)."),
    force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):

    def work(con):
        from kbitcli.formats.registry import writer

        # without a recipe, a format starts from its own defaults (GGUF: int, blocks of 32); flags still win
        base = load_recipe(recipe) if recipe else Recipe(**writer(fmt).defaults)
        k = int(gguf_type[1]) if bits is None and gguf_type and gguf_type[1:2].isdigit() else bits
        r = with_flags(base, bits=k, block_size=block_size, dtype=data_type, double_quant=double_quant,
                       scale_dtype=scale_dtype, scale_search=scale_search, method=method, targets=targets,
                       ignore=ignore, overrides=override or (), scale_refit=scale_refit)
        c = calibration_from_options(calib, calib_tokens, seed, damp, act_order)
        result = encode(src, dst, r, max_shard_size=max_shard_size, force=force, dry_run=dry_run,
                        progress=progress_for(quiet, con), fmt=fmt, gguf_type=gguf_type, calib=c)
        return result

    run(work, as_json=as_json, quiet=quiet, show=lambda result, con: show_plan(result, con, verbose))


def _recipe_text(r: Recipe) -> str:
    return (f"k={r.bits}, block {r.block_size}, {r.dtype} codebook, {r.scale_dtype} scales, "
            f"double quant {'on' if r.double_quant else 'off'}, method {r.method}")


def _help() -> str:
    """encode's help, with the settings used without --recipe, read from Recipe() and each format's defaults."""
    base = Recipe()
    formats = []
    for name, w in WRITERS.items():
        changed = {k: v for k, v in w.defaults.items() if getattr(base, k) != v}
        if changed:
            formats.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in changed.items()))
    return ("Quantize SRC to k bits and write a kbit checkpoint to DST.\n\n"
            f"Without --recipe: {_recipe_text(base)}; targets: the 2-D weights of linear layers. "
            + (f"Other --format values start from their own defaults ({'; '.join(formats)}). " if formats else "")
            + "Flags override any of these.")


encode_cmd.__doc__ = _help()
