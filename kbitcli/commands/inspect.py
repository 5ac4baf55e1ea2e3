"""kbit inspect PATH: per-tensor plan, bits per parameter and sizes; --verify re-hashes against the manifest."""

from __future__ import annotations

import typer
from rich.table import Table

from kbitcli.commands.common import JsonOpt, QuietOpt, human_bytes, run
from kbitcli.commands.tables import natural_sorted, print_table
from kbitcli.inspect import inspect


def show(r: dict, con) -> None:
    t = Table(title=f"{r['path']} ({r['format']})", title_justify="left")
    for col in ("tensor", "shape", "k", "block", "type", "bits/param", "bytes"):
        t.add_column(col, overflow="fold" if col == "tensor" else "ellipsis")  # full names: folded on a narrow terminal
    for p in natural_sorted(r["plan"]):  # layers.2 before layers.10
        if p["quantized"]:
            t.add_row(p["name"], "x".join(map(str, p["shape"])), str(p["bits"]), str(p["block_size"]),
                      p["data_type"] + ("+dq" if p["double_quant"] else ""), f"{p['bits_per_param']:.3f}", human_bytes(p["bytes"]))
        else:
            mark = " (default target)" if p.get("default_target") else ""
            t.add_row(p["name"], "x".join(map(str, p["shape"])), "-", "-", p["dtype"] + mark, str(p["bits_per_param"]),
                      human_bytes(p["bytes"]))
    print_table(con, t)  # in a log: one row per line, however long the names
    if r["format"] != "dense":
        con.print(f"{r['quantized_tensors']}/{r['tensors']} tensors quantized; bits/param "
                  f"{r['bits_per_param_quantized']} (quantized), {r['bits_per_param_model']} (whole model); "
                  f"{human_bytes(r['bytes'])} in {len(r['files'])} file(s)")
        if "verify" in r:
            con.print(f"[green]verified[/green]: {r['verify']['files']} files match the manifest")
    else:
        con.print(f"{r['tensors']} tensors, {r['params']:,} params, {human_bytes(r['bytes'])}; "
                  f"{r['default_targets']} would be quantized by default")


def inspect_cmd(
    path: str = typer.Argument(..., help="A kbit checkpoint, or a dense one (lists its tensors)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file against the manifest (exit 1 on mismatch)."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt,
):
    """Show what a checkpoint holds."""
    run(lambda con: inspect(path, verify), as_json=as_json, quiet=quiet, show=show)
