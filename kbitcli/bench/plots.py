"""The scaling study's files: results.csv / results.json, report.md and the figures in the paper's style.

Figures (matplotlib, Agg backend, no display needed): metric against total model bits on a log axis.
- plots/dtype-<type>.png: one per data type; one line per k, its points the block sizes (more bits = smaller
  blocks), one panel per model; the dense model is the dashed reference.
- plots/block-<B>.png: one per block size; one line per k, its points the data types at that (k, B) (same
  bits, so the spread shows what the data type buys), one panel per model.
- plots/frontier.png: every cell, with the Pareto frontier drawn through the best ones.
Lower is better for every metric (KL to the dense model for causal LMs; 1 - cosine for encoders); both axes are logarithmic.
"""

from __future__ import annotations

import csv
import json
import os

from kbitcli.bench.frontier import describe_cell, frontier, varies_search
from kbitcli.io.atomic import AtomicOutput

COLUMNS = ("model", "kind", "bits", "block_size", "dtype", "double_quant", "total_bits", "params", "bits_per_param_model",
           "bits_per_param", "method", "metric_name", "metric", "nll", "ppl", "kl_divergence", "top1_agreement", "cosine_mean",
           "cosine_min", "on_frontier")
MARKERS = {"nf": "o", "fp": "s", "int": "^", "quantile": "D", "dynamic": "v"}


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


def plot_all(out: str, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    cells = [r for r in rows if r["dtype"] != "dense"]
    figures = []
    for dt in dict.fromkeys(c["dtype"] for c in cells):
        figures.append(_figure(out, f"dtype-{dt}", f"data type {dt}: one line per k over block sizes", rows,
                               lambda c, dt=dt: c["dtype"] == dt, line_key=lambda c: c["block_size"]))
    for b in dict.fromkeys(c["block_size"] for c in cells):
        figures.append(_figure(out, f"block-{b}", f"block size {b}: one line per k over data types", rows,
                               lambda c, b=b: c["block_size"] == b, line_key=lambda c: c["dtype"]))
    figures.append(_frontier_figure(out, rows))
    return figures


def _panels(rows):
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    return fig, list(zip(models, axes[0]))


def _style(ax, model: str, rows: list[dict]):
    from matplotlib.ticker import FuncFormatter

    metric = rows[0]["metric_name"]
    ax.set_xscale("log")
    ax.set_yscale("log")  # nll from a broken 2-bit model to near-dense spans a decade; 1 - cosine spans several
    mbit = FuncFormatter(lambda x, _: f"{x / 1e9:.3g}G" if x >= 1e9 else f"{x / 1e6:.3g}M")
    for which in ("major", "minor"):
        (ax.xaxis.set_major_formatter if which == "major" else ax.xaxis.set_minor_formatter)(mbit)
        ax.tick_params(axis="x", which=which, labelsize=7, labelrotation=40)
    ax.set_xlabel("total model bits (M = 10^6, G = 10^9)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(model, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    dense = next((r for r in rows if r["dtype"] == "dense"), None)
    if dense is not None and metric not in ("1-cosine", "kl"):
        ax.axhline(dense["metric"], color="black", linestyle="--", linewidth=1, label=f"dense ({dense['metric']:.4g})")
        ax.plot([dense["total_bits"]], [dense["metric"]], "k*", markersize=9)
    if metric not in ("1-cosine", "kl"):  # nll spans less than a decade: evenly spaced, plainly labelled ticks
        import numpy as np
        from matplotlib.ticker import NullFormatter

        lo, hi = ax.get_ylim()
        ax.set_yticks(np.geomspace(lo, hi, 7)[1:-1])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", labelsize=7)


def _save(fig, out: str, stem: str) -> str:
    rel = os.path.join("plots", f"{stem}.png")
    fig.tight_layout()
    path = os.path.join(out, rel)
    with AtomicOutput(path, folder=False, force=True) as o:
        fig.savefig(o.tmp, dpi=110, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return rel


def _figure(out, stem, title, rows, select, line_key) -> str:
    import matplotlib.pyplot as plt

    fig, panels = _panels(rows)
    cmap = plt.get_cmap("viridis")
    for model, ax in panels:
        mine = [r for r in rows if r["model"] == model]
        chosen = [r for r in mine if r["dtype"] != "dense" and select(r)]
        ks = sorted({r["bits"] for r in chosen})
        for k in ks:
            pts = sorted((r for r in chosen if r["bits"] == k), key=lambda r: (r["total_bits"], r["metric"]))
            color = cmap((k - 2) / 6)
            ax.plot([p["total_bits"] for p in pts], [p["metric"] for p in pts], "-", color=color, label=f"{k}-bit")
            for p in pts:
                ax.plot(p["total_bits"], p["metric"], MARKERS.get(p["dtype"], "o"), color=color, markersize=5)
        _style(ax, model, mine)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, out, stem)


def _frontier_figure(out, rows) -> str:

    fig, panels = _panels(rows)
    for model, ax in panels:
        mine = [r for r in rows if r["model"] == model]
        cells = [r for r in mine if r["dtype"] != "dense"]
        ax.scatter([c["total_bits"] for c in cells], [c["metric"] for c in cells], s=12, color="0.6", label="cells")
        front = frontier(mine)
        ax.step([c["total_bits"] for c in front], [c["metric"] for c in front], "r-", where="post", label="frontier")
        for c in front:
            ax.annotate(_label(c, rows), (c["total_bits"], c["metric"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        _style(ax, model, mine)
        ax.legend(fontsize=7)
    fig.suptitle("Pareto frontier: best configuration for each bit budget", fontsize=11)
    return _save(fig, out, "frontier")


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
                  "### All cells", "", "| config | total bits | bits/param (model) | metric | KL | top-1 | cosine min |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (r["total_bits"], r["metric"])):
            def fmt(key, spec=".5g"):
                return "" if r.get(key) is None else format(r[key], spec)
            lines.append(f"| {_label(r, rows)}{' **(frontier)**' if r['on_frontier'] else ''} | {r['total_bits']:,} | "
                         f"{r['bits_per_param_model']:.3f} | {r['metric']:.5g} | {fmt('kl_divergence')} | "
                         f"{fmt('top1_agreement', '.4f')} | {fmt('cosine_min')} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
