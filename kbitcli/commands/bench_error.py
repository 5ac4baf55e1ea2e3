"""kbit bench error SRC: data-free SQNR / MSE / bits per parameter, for the recipe or a --grid of them."""

from __future__ import annotations

import csv
import json
import os
from typing import List, Optional

import typer
from rich.table import Table

from kbitcli.commands.options import (BenchForceOpt, BitsOpt, BlockSizeOpt, DataTypeOpt, DoubleQuantOpt, IgnoreOpt,
                                     OverrideOpt, RecipeOpt, RemovedDtypeOpt, ScaleDtypeOpt, ScaleRefitOpt, ScaleSearchOpt, TargetsOpt,
                                     recipe_from_options)
from kbitcli.commands.common import JsonOpt, QuietOpt, progress_for, run

CONFIG_COLUMNS = ("bits", "block_size", "dtype", "double_quant", "scale_dtype", "scale_search", "bits_per_param", "bits_per_param_model",
                  "sqnr_db", "mse", "quantized_tensors", "quantized_params", "params")
TENSOR_COLUMNS = ("name", "shape", "params", "bits_per_param", "sqnr_db", "mse")


def show(r: dict, con) -> None:
    configs = r["configs"]
    if len(configs) == 1:
        t = Table(title=f"{r['source']}: per tensor", title_justify="left")
        for col in ("tensor", "shape", "bits/param", "SQNR dB", "MSE"):
            t.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
        for x in configs[0]["tensors"]:
            t.add_row(x["name"], "x".join(map(str, x["shape"])), f"{x['bits_per_param']:.3f}", _db(x['sqnr_db']),
                      f"{x['mse']:.3e}")
        con.print(t)
    t = Table(title=f"{r['source']}: whole model (quantized tensors)", title_justify="left")
    for col in ("k", "block", "type", "bits/param", "model bits/param", "SQNR dB", "MSE"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for c in configs:
        t.add_row(str(c["bits"]), str(c["block_size"]), c["dtype"] + ("+dq" if c["double_quant"] else ""),
                  f"{c['bits_per_param']:.3f}", f"{c['bits_per_param_model']:.3f}", _db(c['sqnr_db']), f"{c['mse']:.3e}")
    con.print(t)
    if r.get("note"):
        con.print(f"[yellow]note[/yellow]: {r['note']}")
    if r.get("out"):
        con.print(f"wrote {', '.join(r['files'])} to {r['out']}")


def _db(v) -> str:
    return "exact" if v is None else f"{v:.2f}"


def write_out(r: dict, out: str, force: bool) -> list[str]:
    from kbitcli.io.atomic import AtomicOutput

    with AtomicOutput(out, folder=True, force=force) as o:
        with open(os.path.join(o.tmp, "error.json"), "w") as fh:
            json.dump(r, fh, indent=1)
        with open(os.path.join(o.tmp, "error_configs.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CONFIG_COLUMNS)
            for c in r["configs"]:
                w.writerow([c[k] for k in CONFIG_COLUMNS])
        with open(os.path.join(o.tmp, "error_tensors.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(("bits", "block_size", "dtype", "double_quant") + TENSOR_COLUMNS)
            for c in r["configs"]:
                for x in c["tensors"]:
                    w.writerow([c["bits"], c["block_size"], c["dtype"], c["double_quant"]]
                               + ["x".join(map(str, x["shape"])) if k == "shape" else x[k] for k in TENSOR_COLUMNS])
    return ["error.json", "error_configs.csv", "error_tensors.csv"]


def bench_error_cmd(
    src: str = typer.Argument(..., help="Checkpoint: dense file or folder (or a k-bit one: its decoded weights are re-quantized)."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="e.g. 'bits=2..8 block=32,64,128 dtype=nf,fp,int,quantile,dynamic' (keys not given come from the recipe)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for error.json, error_configs.csv and error_tensors.csv."),
    recipe: Optional[str] = RecipeOpt, bits: Optional[int] = BitsOpt, block_size: Optional[str] = BlockSizeOpt,
    data_type: Optional[str] = DataTypeOpt, double_quant: Optional[bool] = DoubleQuantOpt,
    scale_dtype: Optional[str] = ScaleDtypeOpt, scale_search: Optional[int] = ScaleSearchOpt,
    scale_refit: Optional[bool] = ScaleRefitOpt,
    targets: Optional[List[str]] = TargetsOpt,
    ignore: Optional[List[str]] = IgnoreOpt, override: Optional[List[str]] = OverrideOpt,
    force: bool = BenchForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):
    """Quantization error (SQNR, MSE) and bits per parameter, per tensor and for the whole model; no data needed."""
    from kbitcli.bench.error import bench_error, parse_grid
    from kbitcli.io.atomic import check_destination

    def work(con):
        g = parse_grid(grid) if grid else None
        if out is not None:
            check_destination(out, force)
        r = recipe_from_options(recipe, bits, block_size, data_type, double_quant, scale_dtype, targets, ignore,
                                override, scale_search, scale_refit=scale_refit)
        result = bench_error(src, r, g, progress=progress_for(quiet, con, steps=True))
        if out is not None:
            result["files"] = write_out(result, out, force)
            result["out"] = out
        return result

    run(work, as_json=as_json, quiet=quiet, show=show)
