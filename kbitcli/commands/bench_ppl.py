"""kbit bench ppl MODEL --text FILE: dense vs k-bit perplexity, KL and top-1 agreement (encoders: cosine)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from kbitcli.commands.options import (ActOrderOpt, BitsOpt, BlockSizeOpt, CalibOpt, CalibTokensOpt, DampOpt,
                                     DataTypeOpt, DoubleQuantOpt, IgnoreOpt, MethodOpt, OverrideOpt, RecipeOpt,
                                     RemovedDtypeOpt, ScaleDtypeOpt, ScaleRefitOpt, ScaleSearchOpt, SeedOpt, TargetsOpt,
                                     calibration_from_options, recipe_from_options)
from kbitcli.commands.common import JsonOpt, QuietOpt, progress_for, run


def show(r: dict, con) -> None:
    q, b = r["quantized"], r["baseline"]
    t = Table(title=f"{r['model']} on {r['text']}", title_justify="left")
    t.add_column("model")
    t.add_column("bits/param", justify="right")
    kbit_row = "k-bit layers" if r["evaluation"] == "kbit" else "simulated (dense, dequantized weights)"
    if r["kind"] == "causal":
        for col in ("nll (nats/token)", "ppl", "KL vs dense", "top-1 agreement"):
            t.add_column(col, justify="right")
        t.add_row("dense" if b["source"] == "dense" else "dense (decoded)", "-", f"{b['nll']:.4f}", f"{b['ppl']:.3f}", "-", "-")
        t.add_row(kbit_row, _bits(q), f"{q['nll']:.4f}", f"{q['ppl']:.3f}", f"{q['kl_divergence']:.5f}",
                  f"{q['top1_agreement']:.2%}")
    else:
        t.add_column("cosine vs dense: mean", justify="right")
        t.add_column("min", justify="right")
        t.add_row(kbit_row, _bits(q), f"{q['cosine_mean']:.5f}", f"{q['cosine_min']:.5f}")
    con.print(t)
    how = r["tokenization"]
    unit = f"{r['lines']} lines, mean-pooled" if r["kind"] == "encoder" else (
        f"{how['documents']} {how['mode'] if how['mode'] == 'stream' else 'documents split on ' + repr(how['separator'])}, "
        f"stride {r['stride']}")
    con.print(f"context {r['context']}, {r['tokens']:,} tokens ({unit}); tokenizer: {r['tokenizer']}")
    if r["kind"] == "causal":
        # the noise of the scored text: two cells whose ΔNLL differ by less than ~2 standard errors are a tie
        con.print(f"ΔNLL vs dense {q['delta_nll']:+.4f} ± {q['delta_nll_se']:.4f} nats/token (standard error over the "
                  "windows; KL is the steadier measure)")
    if q.get("recipe"):
        rc = q["recipe"]
        cal = rc.get("calibration")
        con.print(f"recipe: k={rc['bits']} block={rc['block_size']} {rc['dtype']}" + ("+dq" if rc.get("double_quant") else "")
                  + f", method {rc.get('method', 'rtn')}"
                  + (f", calibrated on {cal['tokens_used']:,} tokens of {cal['file']}" if cal else ""))
    if b.get("note"):
        con.print(f"[yellow]note[/yellow]: {b['note']}")


def _bits(q: dict) -> str:
    return "-" if q.get("bits_per_param") is None else f"{q['bits_per_param']:.3f} ({q['bits_per_param_model']:.2f} model)"


def bench_ppl_cmd(
    model: str = typer.Argument(..., help="Dense Hugging Face model folder (encoded with the options below), or a kbit checkpoint folder."),
    text: str = typer.Option(..., "--text", help="UTF-8 text file to evaluate on."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per window (default: 512, or the model's limit if smaller)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Start a window every N tokens (default: --context, no overlap); each token is scored once."),
    split_on: str = typer.Option("auto", "--split-on", help="'auto' (documents on <|endoftext|> if present), 'none' (one stream) or a separator string."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most N tokens (causal LMs)."),
    max_lines: Optional[int] = typer.Option(None, "--max-lines", help="Embed at most N lines (encoders)."),
    simulate: bool = typer.Option(False, "--simulate", help="Run the dense model with dequantized weights instead of k-bit layers (same numbers, faster to set up)."),
    recipe: Optional[str] = RecipeOpt, bits: Optional[int] = BitsOpt, block_size: Optional[str] = BlockSizeOpt,
    data_type: Optional[str] = DataTypeOpt, double_quant: Optional[bool] = DoubleQuantOpt,
    scale_dtype: Optional[str] = ScaleDtypeOpt, scale_search: Optional[int] = ScaleSearchOpt,
    scale_refit: Optional[bool] = ScaleRefitOpt,
    method: Optional[str] = MethodOpt, calib: Optional[str] = CalibOpt, calib_tokens: Optional[int] = CalibTokensOpt,
    seed: int = SeedOpt, damp: Optional[float] = DampOpt, act_order: bool = ActOrderOpt,
    targets: Optional[List[str]] = TargetsOpt,
    ignore: Optional[List[str]] = IgnoreOpt, override: Optional[List[str]] = OverrideOpt,
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Dense original of an already quantized MODEL (kbit, bnb, compressed-tensors, GGUF folder): score MODEL against it."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):
    """Perplexity, KL divergence and top-1 agreement of a k-bit model against its dense original."""
    from kbitcli.bench.ppl import bench_ppl

    def work(con):
        r = recipe_from_options(recipe, bits, block_size, data_type, double_quant, scale_dtype, targets, ignore,
                                override, scale_search, method, scale_refit)
        c = calibration_from_options(calib, calib_tokens, seed, damp, act_order)
        return bench_ppl(model, text, r, context=context, stride=stride, split_on=split_on, max_tokens=max_tokens,
                         max_lines=max_lines, simulate=simulate, progress=progress_for(quiet, con, steps=True), baseline=baseline,
                         calib=c)

    run(work, as_json=as_json, quiet=quiet, show=show)
