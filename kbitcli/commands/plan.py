"""kbit plan SRC --budget B: per-tensor bits, block size and data type for a budget, as a recipe YAML."""

from __future__ import annotations

import os
import shlex
import sys
from typing import List, Optional

import typer
from rich import box
from rich.table import Table

from kbitcli.commands.common import ForceOpt, JsonOpt, QuietOpt, human_bytes, progress_for, run
from kbitcli.commands.options import IgnoreOpt, RecipeOpt, SeedOpt, TargetsOpt
from kbitcli.commands.tables import group_rows, print_table


def plan_table(result: dict, verbose: bool = False) -> Table:
    """One row per tensor role and choice (`model.layers.*.mlp.down_proj.weight`, layers 0-3,7), or per tensor."""
    t = Table(title=f"plan for {result['budget']['text']}", title_justify="left", box=box.SIMPLE_HEAD,
              show_edge=False, pad_edge=False, collapse_padding=True)
    cols = ("tensor", "layers", "count", "choice", "bits/param", "loss share")
    for col in cols:
        t.add_column(col, justify="right" if col in ("count", "bits/param", "loss share") else "left",
                     overflow="fold" if col == "tensor" else "ellipsis", no_wrap=col != "tensor")
    rows = [{**r, "quantized": True, "data_type": r["dtype"], "bytes_out": r["bytes"], "dtype": None}
            for r in result["tensors"]]
    if verbose:
        for r in rows:
            t.add_row(r["name"], "-", "1", r["choice"], f"{r['bits_per_param']:.3f}", f"{r['share']:.1%}")
        return t
    for g in group_rows(rows):
        share = sum(r["share"] for r in g.rows)
        t.add_row(g.name, g.layers, str(g.count), g.first["choice"], f"{g.bits_per_param():.3f}", f"{share:.1%}")
    return t


def show(result: dict, con, verbose: bool) -> None:
    print_table(con, plan_table(result, verbose))
    p = result["predicted"]
    soft = not con.is_terminal
    con.print(f"{len(result['tensors'])} tensors, {result['quantized_params']:,} quantized params: "
              f"{p['bits_per_param_quantized']:.4f} bits/param (budget {result['budget']['text']}; choices allow "
              f"{result['limits']['bits_per_param'][0]}..{result['limits']['bits_per_param'][1]}), "
              f"{p['bytes_out']:,} bytes ({human_bytes(p['bytes_out'])}) as encode writes them; predicted loss "
              f"{p['loss']:.4g} ({result['sensitivity']} sensitivity) in {result['seconds']} s", soft_wrap=soft)
    for what in ("output", "plot"):
        if result.get(what):
            con.print(f"wrote {result[what]}", soft_wrap=soft)
    if not result.get("output"):
        sys.stdout.write(result["recipe_yaml"])  # the product: `kbit plan ... > plan.yaml` works too


def plan_cmd(
    src: str = typer.Argument(..., help="Dense checkpoint: a Hugging Face model folder or a .safetensors file."),
    budget: str = typer.Option(..., "--budget", "-B", help="Bits per quantized parameter (e.g. 3.5), or the size of "
                               "the output as encode writes it, with a unit (e.g. 60MB, 1.2GiB)."),
    choices: str = typer.Option(None, "--choices", help="The grid each tensor chooses from (default: "
                                "\"bits=2..8 block=32,64,128 dtype=nf,int dq=true\"); keys left out keep the default."),
    recipe: Optional[str] = RecipeOpt, targets: Optional[List[str]] = TargetsOpt, ignore: Optional[List[str]] = IgnoreOpt,
    calib: Optional[str] = typer.Option(None, "--calib", help="Text to measure sensitivity on (plain or JSONL 'text'), "
                                        "or 'self': text the model samples itself (default: none, data-free)."),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="Calibration tokens the sensitivity runs on."),
    seed: int = SeedOpt,
    sensitivity: Optional[str] = typer.Option(None, "--sensitivity", help="weight (data-free) | activation | fisher "
                                              "(default: fisher with --calib, weight without)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the recipe here (default: print it on stdout)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG of bits per layer (default with -o: next to it, .png)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="As encode will be given it (a size budget counts its files)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One row per tensor."),
    force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
):
    """Spend a budget of bits where the model needs them: per-tensor k, block size and data type, solved from each
    tensor's measured sensitivity, written as a recipe that `kbit encode SRC DST --recipe plan.yaml` encodes to
    exactly the predicted size."""

    def work(con):
        from kbitcli.allocate.choices import DEFAULT_CHOICES
        from kbitcli.allocate.figure import save_figure
        from kbitcli.allocate.planner import plan
        from kbitcli.calibration.data import Calibration
        from kbitcli.io.atomic import AtomicOutput, check_destination
        from kbitcli.recipes import load_recipe, with_flags

        png = plot or (os.path.splitext(output)[0] + ".png" if output else None)
        for path in filter(None, (output, png)):  # before any work: an existing file needs --force
            check_destination(path, force, folder=False)
        if output and png and os.path.abspath(output) == os.path.abspath(png):
            from kbitcli.errors import bad_input

            raise bad_input(f"--plot {png}: the same file as --output; give the figure a .png name")
        r = with_flags(load_recipe(recipe), targets=targets, ignore=ignore)
        c = None
        if calib is not None:
            c = Calibration(calib, calib_tokens, seed)
            if calib != "self":  # self: the model writes its own text (allocate/sensitivity.py)
                c.check()
        # the command that makes this plan again, for the recipe's header (from the options, not sys.argv: the
        # same in a test runner, and without paths nobody needs such as -o)
        given = [("--choices", choices), ("--recipe", recipe), ("--calib", calib),
                 ("--calib-tokens", calib_tokens if calib else None), ("--seed", seed if calib and seed else None),
                 ("--sensitivity", sensitivity)]
        given += [("--targets", p) for p in targets or ()] + [("--ignore", p) for p in ignore or ()]
        command = " ".join(["kbit", "plan", shlex.quote(src), "--budget", shlex.quote(budget)]
                           + [f"{k} {shlex.quote(str(v))}" for k, v in given if v is not None])
        result = plan(src, budget, choices=choices or DEFAULT_CHOICES, recipe=r, calib=c, sensitivity=sensitivity,
                      max_shard_size=max_shard_size, progress=progress_for(quiet, con), command=command)
        if output:
            with AtomicOutput(output, folder=False, force=force) as out, open(out.tmp, "w") as fh:
                fh.write(result["recipe_yaml"])
            result["output"] = output
        if png:
            title = (f"{os.path.basename(os.path.normpath(src))}: {result['predicted']['bits_per_param_quantized']:.3f} "
                     f"bits/param for budget {result['budget']['text']} ({result['sensitivity']} sensitivity)")
            result["plot"] = save_figure(result["tensors"], title, png, force)
        return result

    run(work, as_json=as_json, quiet=quiet, show=lambda result, con: show(result, con, verbose))
