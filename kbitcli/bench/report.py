"""The scaling study's result files: results.csv / results.json, report.md (the verdict table and the figures)."""

from __future__ import annotations

import csv
import json
import os

from kbitcli.bench.frontier import describe_cell, frontier, varies_search
from kbitcli.bench.plots import plot_all
from kbitcli.io.atomic import AtomicOutput

COLUMNS = ("model", "kind", "bits", "block_size", "dtype", "double_quant", "total_bits", "params", "bits_per_param_model",
           "bits_per_param", "method", "scale_refit", "metric_name", "metric", "nll", "ppl", "delta_nll", "delta_nll_se",
           "kl_divergence", "top1_agreement", "cosine_mean", "cosine_min", "on_frontier")

def _label(c: dict, rows: list[dict]) -> str:

    return describe_cell(c, varies_search(rows))


def _write(path: str, write) -> None:
    """One file, all or nothing (a crash never leaves a half-written report)."""
    with AtomicOutput(path, folder=False, force=True) as out:
        with open(out.tmp, "w", newline="") as fh:
            write(fh)


def write_results(out: str, study: dict, cells: list[dict], result: dict) -> list[str]:

    on_front = {id(c) for name in {c["model"] for c in cells} for c in frontier([x for x in cells if x["model"] == name])}
    rows = [{**c, "on_frontier": id(c) in on_front} for c in cells]

    def table(fh):
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in COLUMNS])

    _write(os.path.join(out, "results.csv"), table)
    _write(os.path.join(out, "results.json"), lambda fh: json.dump({**result, "rows": rows}, fh, indent=1, default=str))
    figures = plot_all(out, rows)
    _write(os.path.join(out, "report.md"), lambda fh: fh.write(report(study, rows, result, figures)))
    return ["results.csv", "results.json", "report.md"] + figures



def dnll(r: dict) -> str:
    """ΔNLL vs dense with its standard error over the scored windows (causal cells; the dense row has neither)."""
    if r.get("delta_nll") is None:
        return ""
    return f"{r['delta_nll']:+.4f} ± {r['delta_nll_se']:.4f}" if r.get("delta_nll_se") is not None else f"{r['delta_nll']:+.4f}"


def shown(path: str) -> str:
    """A path as a report shows it: relative to where the study ran, never the machine's absolute layout."""
    rel = os.path.relpath(os.path.abspath(path))
    return os.path.basename(path) if rel.startswith("..") else rel


def report(study: dict, rows: list[dict], result: dict, figures: list[str]) -> str:
    calib = study.get("calib")
    lines = [f"# Scaling study `{study['name']}`", "",
             f"- study file: `{shown(study['file'])}`", f"- text: `{shown(study['text'])}`",
             *([f"- calibration (method gptq cells): `{shown(calib.path)}`, {calib.tokens} tokens, seed {calib.seed}"]
               if calib is not None else []),
             f"- evaluation: {result['evaluation']}: numerically the k-bit forward up to float rounding",
             f"- cells: {result['cells']} ({result['evaluated']} evaluated now, {result['reused']} reused)",
             "- total model bits count every stored bit: quantized tensors at k plus scales (and codebooks), "
             "other tensors at their stored width", ""]
    for model, v in result["verdict"].items():
        mine = [r for r in rows if r["model"] == model]
        first = next(r for r in mine if r["dtype"] == "dense")
        lines += [f"## {model} ({first['kind']}; metric {first['metric_name']}, lower is better)", "",
                  f"context {first.get('context')}, {first.get('tokens')} tokens; tokenizer: {first.get('tokenizer')}", "",
                  "### Verdict: best configuration for each bit budget (Pareto frontier)", "",
                  "| total bits from | below | bits/param (model) | best | metric |", "|---|---|---|---|---|"]
        for f in v["frontier"]:
            lines.append(f"| {f['from_bits']:,} | {'' if f['below_bits'] is None else format(f['below_bits'], ',')} | "
                         f"{f['bits_per_param_model']:.3f} | {f['config']} | {f['metric']:.5g} |")
        lines += ["", f"k on the frontier: {v['frontier_bits']}. Best cell of each k:", "",
                  "| k | best | total bits | metric |", "|---|---|---|---|"]
        lines += [f"| {k} | {b['config']} | {b['total_bits']:,} | {b['metric']:.5g} |" for k, b in v["best_per_k"].items()]
        lines += ["",
                  "### All cells", "", "| config | total bits | bits/param (model) | metric | KL | ΔNLL ± SE | top-1 | cosine min |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (r["total_bits"], r["metric"])):
            def fmt(key, spec=".5g"):
                return "" if r.get(key) is None else format(r[key], spec)
            lines.append(f"| {_label(r, rows)}{' **(frontier)**' if r['on_frontier'] else ''} | {r['total_bits']:,} | "
                         f"{r['bits_per_param_model']:.3f} | {r['metric']:.5g} | {fmt('kl_divergence')} | {dnll(r)} | "
                         f"{fmt('top1_agreement', '.4f')} | {fmt('cosine_min')} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
