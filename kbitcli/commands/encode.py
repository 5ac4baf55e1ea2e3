"""kbit encode SRC DST: quantize a dense checkpoint (flags override the recipe)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from kbitcli.commands.common import ForceOpt, JsonOpt, QuietOpt, human_bytes, progress_for, run
from kbitcli.commands.options import (ActOrderOpt, BitsOpt, BlockSizeOpt, CalibOpt, CalibTokensOpt, DampOpt,
                                     DataTypeOpt, DoubleQuantOpt, IgnoreOpt, MethodOpt, OverrideOpt, RecipeOpt,
                                     RemovedDtypeOpt, ScaleDtypeOpt, ScaleSearchOpt, SeedOpt, TargetsOpt,
                                     calibration_from_options)
from kbitcli.encode import DEFAULT_SHARD, encode
from kbitcli.recipes import Recipe, load_recipe, with_flags


def show_plan(result: dict, con, limit: int | None = None) -> None:
    t = Table(title="plan" if result.get("dry_run") else "encoded", title_justify="left")
    for col in ("tensor", "shape", "k", "block", "type", "bits/param", "rule"):
        # names wrap rather than being cut with an ellipsis: the plan must name every tensor in full
        t.add_column(col, justify="right" if col in ("k", "bits/param") else "left",
                     overflow="fold" if col == "tensor" else "ellipsis")
    rows = result["plan"] if limit is None else result["plan"][:limit]
    for p in rows:
        if p["quantized"]:
            t.add_row(p["name"], "x".join(map(str, p["shape"])), str(p["bits"]), str(p["block_size"]),
                      p["data_type"] + ("+dq" if p["double_quant"] else "") + (" gptq" if p.get("method") == "gptq" else ""), f"{p['bits_per_param']:.3f}", p["rule"])
        else:
            t.add_row(f"[dim]{p['name']}[/dim]", "x".join(map(str, p["shape"])), "-", "-", f"[dim]{p['dtype']}[/dim]",
                      f"{p['bits_per_param']:.0f}", f"[dim]{p['rule']}[/dim]")
    con.print(t)
    q = result.get("bits_per_param_quantized")
    con.print(f"{result['quantized_tensors']}/{result['tensors']} tensors quantized, "
              f"{result['quantized_params']:,}/{result['params']:,} params; "
              f"bits/param: {q if q is not None else '-'} (quantized), {result['bits_per_param_model']} (whole model); "
              f"{human_bytes(result['bytes_in'])} -> {human_bytes(result['bytes_out'])}"
              + (f" in {result['seconds']} s" if "seconds" in result else "")
              + (" [bold](dry run: nothing written)[/bold]" if result.get("dry_run") else f" -> {result['destination']}"))
    cal = result.get("calibration")
    if cal:
        con.print(f"calibrated on {cal['tokens_used']:,} tokens of {cal['file']} (seed {cal['seed']}) in {cal['seconds']} s; "
                  f"{cal['calibrated_tensors']} tensors calibrated"
                  + (f", {len(cal['uncalibrated'])} outside the model's blocks rounded without it" if cal["uncalibrated"] else ""))
    for note in result.get("notes", []):  # --format bnb/compressed-tensors/gguf: what the target format changes
        con.print(f"[yellow]note:[/yellow] {note}")


def encode_cmd(
    src: str = typer.Argument(..., help="Dense checkpoint: .safetensors/.bin file or Hugging Face model folder."),
    dst: str = typer.Argument(..., help="Output: a folder for a folder SRC, a file for a file SRC."),
    recipe: Optional[str] = RecipeOpt, bits: Optional[int] = BitsOpt, block_size: Optional[str] = BlockSizeOpt,
    data_type: Optional[str] = DataTypeOpt, double_quant: Optional[bool] = DoubleQuantOpt,
    scale_dtype: Optional[str] = ScaleDtypeOpt, scale_search: Optional[int] = ScaleSearchOpt,
    method: Optional[str] = MethodOpt, calib: Optional[str] = CalibOpt, calib_tokens: Optional[int] = CalibTokensOpt,
    seed: int = SeedOpt, damp: Optional[float] = DampOpt, act_order: bool = ActOrderOpt,
    targets: Optional[List[str]] = TargetsOpt, ignore: Optional[List[str]] = IgnoreOpt,
    override: Optional[List[str]] = OverrideOpt,
    max_shard_size: str = typer.Option(DEFAULT_SHARD, "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan and sizes and run every check a real run makes (reads each tensor once for NaN/Inf and scale range); quantize and write nothing."),
    fmt: str = typer.Option("kbit", "--format", "-f", help="kbit | bnb | compressed-tensors | gguf (see docs/INTEROP.md)."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="With --format gguf: Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 (default: from --bits)."),
    force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):
    """Quantize SRC to k bits and write a kbit checkpoint to DST."""

    def work(con):
        from kbitcli.formats.registry import writer

        # without a recipe, a format starts from its own defaults (GGUF: int, blocks of 32); flags still win
        base = load_recipe(recipe) if recipe else Recipe(**writer(fmt).defaults)
        k = int(gguf_type[1]) if bits is None and gguf_type and gguf_type[1:2].isdigit() else bits
        r = with_flags(base, bits=k, block_size=block_size, dtype=data_type, double_quant=double_quant,
                       scale_dtype=scale_dtype, scale_search=scale_search, method=method, targets=targets,
                       ignore=ignore, overrides=override or ())
        c = calibration_from_options(calib, calib_tokens, seed, damp, act_order)
        return encode(src, dst, r, max_shard_size=max_shard_size, force=force, dry_run=dry_run,
                      progress=progress_for(quiet, con), fmt=fmt, gguf_type=gguf_type, calib=c)

    run(work, as_json=as_json, quiet=quiet, show=show_plan)
