"""kbit bench scaling --recipe study.yaml: the bit-level scaling study (metric vs total model bits, frontier)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from kbitcli.commands.common import JsonOpt, QuietOpt, progress_for, run


def show(r: dict, con) -> None:
    for model, v in r["verdict"].items():
        t = Table(title=f"{model}: best configuration for each bit budget (Pareto frontier)", title_justify="left")
        for col in ("total bits from", "bits/param (model)", "best", v["frontier"][0]["metric_name"]):
            t.add_column(col, justify="left" if col == "best" else "right")
        for f in v["frontier"]:
            t.add_row(f"{f['from_bits']:,}", f"{f['bits_per_param_model']:.3f}", f["config"], f"{f['metric']:.5g}")
        con.print(t)
    con.print(f"{r['cells']} cells ({r['evaluated']} evaluated, {r['reused']} reused) in {r['seconds']} s; "
              f"{r['evaluation']}")
    con.print(f"wrote to {r['out']}: " + ", ".join(r["files"]))


def bench_scaling_cmd(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Study YAML: models, text, grid (see recipes/study-tiny.yaml)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for cells.jsonl, results.csv/json, report.md, plots/ (default: scaling-<study name>)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the finished cells in --out (same text and options)."),
    force: bool = typer.Option(False, "--force", help="--out: start the study over (its finished cells are discarded), or write into a folder that is not a study."),
    plans: Optional[str] = typer.Option(None, "--plans", help="Budgets in bits per quantized parameter (e.g. 3,3.5,4): "
                                        "`kbit plan` mixes drawn with the grid's cells (data type 'plan')."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt,
):
    """Metric vs total model bits over a grid of k x block size x data type, for several models; plots and verdict."""
    from kbitcli.bench.scaling import load_study, parse_plans, run_study

    def work(con):
        budgets = parse_plans(plans)
        dst = out or f"scaling-{load_study(recipe)['name']}"
        return run_study(recipe, dst, resume=resume, force=force, progress=progress_for(quiet, con, steps=True),
                         plans=budgets)

    run(work, as_json=as_json, quiet=quiet, show=show)
