"""kbit bench speed MODEL: encode/decode MB/s, and k-bit vs dense forward latency and memory in one run."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer
from rich.table import Table

from kbitcli.commands.common import JsonOpt, QuietOpt, human_bytes, progress_for, run
from kbitcli.commands.options import (BenchForceOpt, BitsOpt, BlockSizeOpt, DataTypeOpt, DoubleQuantOpt, IgnoreOpt,
                                     OverrideOpt, RecipeOpt, ScaleDtypeOpt, ScaleRefitOpt, ScaleSearchOpt, TargetsOpt, removed_dtype_option,
                                     recipe_from_options)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}x"


def show(r: dict, con) -> None:
    q = r.get("quantization") or {}
    t = Table(title=f"{r['model']}: k={q.get('bits', '?')} {q.get('dtype', '')} B={q.get('block_size', '?')}, "
                    f"batch {r['batch']} x seq {r['seq']}, {r['dtype']}, {r['threads']} thread(s)", title_justify="left")
    for col in ("measure", "dense", "k-bit", "k-bit / dense"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    f, m = r["forward"], r["memory"]
    g = r.get("generate")
    if g:
        tps, vs = g["tokens_per_s"], g["vs_dense"]
        bf = f" (bf16 {tps['dense_bf16']:.1f}: {vs['dense_bf16']:.2f}x)" if "dense_bf16" in tps else ""
        t.add_row(f"generate, batch 1, {g['tokens']} tokens", f"{tps['dense']:.1f} tok/s{bf}", f"{tps['kbit']:.1f} tok/s",
                  f"{vs['kbit']:.2f}x faster" if vs["kbit"] >= 1 else f"{1 / vs['kbit']:.2f}x slower")
    fb = f" (bf16 {f['ms']['dense_bf16']:.2f})" if "dense_bf16" in f["ms"] else ""
    t.add_row(f"forward latency, {r['batch']} x {r['seq']} tokens", f"{f['dense_ms']:.2f} ms{fb}", f"{f['kbit_ms']:.2f} ms",
              _ratio(f["ratio"]))
    p = r.get("prefill")
    if p:
        pb = f" (bf16 {p['ms']['dense_bf16']:.1f})" if "dense_bf16" in p["ms"] else ""
        t.add_row(f"prefill latency, {p['tokens']} tokens", f"{p['ms']['dense']:.1f} ms{pb}", f"{p['ms']['kbit']:.1f} ms",
                  _ratio(p["vs_dense"]["kbit"]))
    t.add_row("weights resident (all tensors)", human_bytes(m["dense_weight_bytes"]), human_bytes(m["kbit_weight_bytes"]),
              _ratio(m["ratio"]))
    qm = m["quantized_modules"]
    t.add_row(f"quantized modules ({qm['modules']})", human_bytes(qm["dense_bytes"]), human_bytes(qm["kbit_bytes"]),
              _ratio(qm["ratio"]))
    t.add_row("  same, vs bf16", human_bytes(qm["bf16_bytes"]), human_bytes(qm["kbit_bytes"]), _ratio(qm["ratio_vs_bf16"]))
    if "rss" in r:
        t.add_row("process RSS growth (load + 1 forward)", human_bytes(r["rss"]["dense_delta"]), human_bytes(r["rss"]["kbit_delta"]),
                  _ratio(r["rss"]["ratio"]))
    con.print(t)
    con.print(f"kernel: {r['kernel']}")
    e, d = r.get("encode"), r["decode"]
    con.print(("encode " + (f"{e['mb_per_s']:.1f} MB/s ({human_bytes(e['bytes_in'])} dense in {e['seconds']:.2f} s); " if e else "-; "))
              + f"decode {d['mb_per_s']:.1f} MB/s ({human_bytes(d['bytes_out'])} dense out in {d['seconds']:.2f} s); "
              f"stored {qm['stored_bits_per_param']:.3f} bits/param in the quantized modules")
    if r.get("out"):
        con.print(f"wrote {r['out']}/speed.json")


def write_out(r: dict, out: str, force: bool) -> None:
    from kbitcli.io.atomic import AtomicOutput

    with AtomicOutput(out, folder=True, force=force) as o:
        with open(os.path.join(o.tmp, "speed.json"), "w") as fh:
            json.dump(r, fh, indent=2)


def bench_speed_cmd(
    model: str = typer.Argument(..., help="Dense Hugging Face model folder (encoded with the options below), or a kbit checkpoint folder."),
    batch: int = typer.Option(1, "--batch", help="Sequences per forward."),
    seq: int = typer.Option(1, "--seq", help="Tokens per sequence of the timed forward (1: one decode step)."),
    generate_tokens: int = typer.Option(32, "--generate-tokens", help="Tokens of greedy batch-1 generation to time "
                                        "(the headline; causal LMs; 0 skips)."),
    prefill: int = typer.Option(128, "--prefill", help="Tokens of the timed prefill forward (0 skips)."),
    runs: int = typer.Option(10, "--runs", help="Timed forwards per model (the median is reported)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed forwards per model first."),
    compute_dtype: str = typer.Option("fp32", "--compute-dtype", help="fp32 | bf16 | fp16 | auto (as stored)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="Also measure RSS growth of loading each model in a fresh process."),
    recipe: Optional[str] = RecipeOpt, bits: Optional[int] = BitsOpt, block_size: Optional[str] = BlockSizeOpt,
    data_type: Optional[str] = DataTypeOpt, double_quant: Optional[bool] = DoubleQuantOpt,
    scale_dtype: Optional[str] = ScaleDtypeOpt, scale_search: Optional[int] = ScaleSearchOpt,
    scale_refit: Optional[bool] = ScaleRefitOpt,
    targets: Optional[List[str]] = TargetsOpt,
    ignore: Optional[List[str]] = IgnoreOpt, override: Optional[List[str]] = OverrideOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Folder to write speed.json into."),
    force: bool = BenchForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
    _dtype: Optional[str] = removed_dtype_option(
        "--dtype is ambiguous and was removed: use --data-type (the codebook: int|fp|nf|quantile|dynamic) "
        "or --compute-dtype (fp32|fp16|bf16)"),
):
    """Batch-1 generation tokens/s, forward and prefill latency, memory and encode/decode MB/s: k-bit vs dense fp32 and bf16, side by side."""
    from kbitcli.bench.speed import bench_speed

    def work(con):
        if out is not None:
            from kbitcli.io.atomic import check_destination

            check_destination(out, force)
        r = recipe_from_options(recipe, bits, block_size, data_type, double_quant, scale_dtype, targets, ignore,
                                override, scale_search, scale_refit=scale_refit)
        result = bench_speed(model, r, batch=batch, seq=seq, runs=runs, warmup=warmup, dtype=compute_dtype,
                             threads=threads, rss=rss, generate_tokens=generate_tokens, prefill=prefill,
                             progress=progress_for(quiet, con, steps=True))
        if out is not None:
            result["out"] = out
            write_out(result, out, force)
        return result

    run(work, as_json=as_json, quiet=quiet, show=show)
