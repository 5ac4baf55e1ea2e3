"""The scaling study's figures, in the paper's style (the result files are bench/report.py).

Figures (matplotlib, Agg backend, no display needed): metric against total model bits, both axes logarithmic,
one panel per model, one shared legend on the right that names every colour, marker and line style used.
Every panel is zoomed on the quantized cells: the dense model (several times their bits) is not a point on
the axis but a labelled reference, a dashed horizontal line at its metric (nll studies), or a note saying
that the metric is 0 for it by definition (KL to dense, 1 - cosine). A top axis gives bits per parameter.
- plots/dtype-<type>.png: one per data type; colour = k, marker = block size, one line per k through its
  block sizes (more bits = smaller blocks).
- plots/block-<B>.png: one per block size; colour = k, marker = data type, one line per k through the data
  types at that (k, B) (same bits, so the vertical spread shows what the data type buys).
- plots/frontier.png: every cell (colour = k, marker = data type; faded when beaten), the Pareto frontier
  as a step line, each frontier cell labelled (labels placed so that none overlap).
A grid key other than bits / block size / data type that varies (method, double quant, scale search) gets a
line style and hollow markers of its own. Lower is better for every metric (KL to the dense model for causal
LMs; 1 - cosine for encoders).
"""

from __future__ import annotations

import os

import numpy as np

from kbitcli.bench.frontier import frontier
from kbitcli.bench.labels import LABEL_FONTSIZE, place_labels
from kbitcli.io.atomic import AtomicOutput

MARKERS = {"nf": "o", "fp": "s", "int": "^", "quantile": "D", "dynamic": "v"}


DPI = 110
BLOCK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
VARIANT_STYLES = (("-", True), ("--", False), (":", False), ("-.", False))  # (line style, filled markers)
VARIANT_FIELDS = ("method", "double_quant", "scale_search", "scale_refit")


def plot_all(out: str, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    cells = [r for r in rows if r["dtype"] != "dense"]
    figures = []
    for dt in dict.fromkeys(c["dtype"] for c in cells):
        figures.append(_save(dtype_figure(rows, dt), out, f"dtype-{dt}"))
    for b in dict.fromkeys(c["block_size"] for c in cells):
        figures.append(_save(block_figure(rows, b), out, f"block-{b}"))
    figures.append(_save(frontier_figure(rows), out, "frontier"))
    return figures


# ---- shared pieces -----------------------------------------------------------------------------------------

def _k_color(k):
    import matplotlib.pyplot as plt

    return plt.get_cmap("viridis")(min(max((k - 2) / 6, 0.0), 1.0))


def _marker(dtype: str) -> str:
    return MARKERS.get(dtype, "o")


def _fmt_bits(x: float) -> str:
    return f"{x / 1e9:.4g}G" if x >= 1e9 else f"{x / 1e6:.4g}M" if x >= 1e6 else f"{x / 1e3:.4g}k"


def _variant_fields(cells: list[dict]) -> list[str]:
    """The grid keys besides k / block / data type whose value differs between cells."""
    return [f for f in VARIANT_FIELDS if len({c.get(f) for c in cells}) > 1]


def _variant(c: dict, fields: list[str]) -> str:
    parts = []
    for f in fields:
        v = c.get(f)
        if f == "method":
            parts.append(str(v))
        elif f == "double_quant":
            parts.append("dq" if v else "no dq")
        elif f == "scale_refit":
            parts.append("refit" if v else "absmax")
        else:
            parts.append(f"search={v}")
    return " ".join(parts)


def _variants(cells: list[dict]) -> dict:
    """variant name -> (line style, filled), in the order first seen; {"": ...} when nothing else varies."""
    fields = _variant_fields(cells)
    names = list(dict.fromkeys(_variant(c, fields) for c in cells))
    return {n: VARIANT_STYLES[i % len(VARIANT_STYLES)] for i, n in enumerate(names)}


def short_label(c: dict, rows: list[dict]) -> str:
    """A frontier label: k, block size B, data type, and whatever else the study varies."""
    fields = _variant_fields([r for r in rows if r["dtype"] != "dense"])
    extra = _variant(c, fields)
    dq = "+dq" if c.get("double_quant") and "double_quant" not in fields else ""
    return f"k={c['bits']} B={c['block_size']} {c['dtype']}{dq}" + (f" {extra}" if extra else "")


def _on_log_axis(c: dict) -> bool:
    """A metric a log axis can show (1 - cosine can round to 0 or below at k = 8; a broken cell can be nan)."""
    import math

    return isinstance(c.get("metric"), (int, float)) and math.isfinite(c["metric"]) and c["metric"] > 0


def _log_ticks(lo: float, hi: float) -> list[float]:
    """4 to 9 round values inside [lo, hi] for a log axis, every one labelled (no unlabelled decade ends)."""
    import math

    from matplotlib.ticker import MaxNLocator

    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    ticks: list[float] = []
    for mant in ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8),
                 (1, 1.1, 1.2, 1.3, 1.4, 1.6, 1.8, 2, 2.2, 2.4, 2.6, 2.8, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9)):
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in range(e0, e1 + 1) for m in mant if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) < 3:  # a narrow range (less than a factor 1.5): plain evenly spaced values
        ticks = [float(f"{t:.6g}") for t in MaxNLocator(5).tick_values(lo, hi) if lo <= t <= hi]
    while len(ticks) > 9:
        ticks = ticks[::2]
    return ticks or [float(np.sqrt(lo * hi))]


def _axes(ax, model: str, mine: list[dict], shown: list[dict], extra_y: list[float]):
    """Log-log axes zoomed on the shown cells (plus extra_y, e.g. the dense line), every tick labelled, and a
    top axis in bits per parameter."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    metric = mine[0]["metric_name"]
    xs = [c["total_bits"] for c in shown]
    ys = [c["metric"] for c in shown if _on_log_axis(c)] + [y for y in extra_y if y > 0 and math.isfinite(y)]
    ax.set_xscale("log")
    ax.set_yscale("log")
    x0, x1 = min(xs), max(xs)
    pad = max(math.log10(x1 / x0) * 0.06, 0.004)
    ax.set_xlim(x0 / 10 ** pad, x1 * 10 ** pad)
    y0, y1 = (min(ys), max(ys)) if ys else (1e-3, 1.0)
    pad = max(math.log10(y1 / y0) * 0.1, 0.01)
    ax.set_ylim(y0 / 10 ** pad, y1 * 10 ** pad)
    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(FixedLocator([t for t in MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                                             if lo <= t <= hi]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _fmt_bits(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(FixedLocator(_log_ticks(*ax.get_ylim())))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.tick_params(labelsize=8)
    ax.set_xlabel("total model bits (M = 10^6, G = 10^9)", fontsize=9)
    ax.set_ylabel(f"{metric} (lower is better)", fontsize=9)
    ax.grid(True, alpha=0.3)
    params = mine[0].get("params")
    if params:
        top = ax.secondary_xaxis("top", functions=(lambda x: x / params, lambda b: b * params))
        top.xaxis.set_major_locator(FixedLocator([t for t in MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]).tick_values(
            lo / params, hi / params) if lo / params <= t <= hi / params]))
        top.xaxis.set_major_formatter(FuncFormatter(lambda b, _: f"{b:g}"))
        top.xaxis.set_minor_locator(NullLocator())
        top.tick_params(labelsize=7)
        top.set_xlabel("bits per parameter (whole model)", fontsize=8)
    ax.set_title(model, fontsize=10)


def _dense_reference(ax, dense: dict | None, metric: str):
    """The dense model lies far right of the zoomed axis. When its metric is above 0 (nll) it is a dashed line
    at that value, labelled just outside the right edge of the axes (where no cell can be under the label).
    Returns the artists (gid 'dense'); a metric that is 0 for dense is noted by _dense_note after the layout."""
    if dense is None or dense["metric"] <= 0:
        return []
    line = ax.axhline(dense["metric"], color="black", linestyle="--", linewidth=1, zorder=1, gid="dense")
    text = ax.annotate(f"dense\n{dense['metric']:.4g}\n({_fmt_bits(dense['total_bits'])}\nbits)", (1, dense["metric"]),
                       xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points", ha="left",
                       va="center", fontsize=LABEL_FONTSIZE, gid="dense", annotation_clip=False)
    return [line, text]


def _dense_note(ax, dense: dict | None, metric: str, points) -> list:
    """For a metric that is 0 for the dense model by definition (KL to dense, 1 - cosine): a note in the corner
    of the axes that covers the fewest points (data coordinates). Call after the layout is final."""
    if dense is None or dense["metric"] > 0:
        return []
    renderer = ax.figure.canvas.get_renderer()
    px = [tuple(ax.transData.transform(p)) for p in points]
    best = None
    for x, y, ha, va in ((0.02, 0.025, "left", "bottom"), (0.98, 0.975, "right", "top"), (0.98, 0.025, "right", "bottom"),
                         (0.02, 0.975, "left", "top")):
        text = ax.text(x, y, f"dense model ({_fmt_bits(dense['total_bits'])} bits, {dense['bits_per_param_model']:.3g} "
                             f"bits/param)\nis the reference: {metric} = 0 for it", transform=ax.transAxes, ha=ha, va=va,
                       fontsize=LABEL_FONTSIZE, gid="dense", bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.6", lw=0.6))
        text.set_in_layout(False)
        covered = sum(text.get_window_extent(renderer).padded(4).contains(*p) for p in px)
        if best is None or covered < best[0]:
            if best is not None:
                best[1].remove()
            best = (covered, text)
        else:
            text.remove()
        if covered == 0:
            break
    return [best[1]]


def _panels(rows, title):
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.0 * len(models) + 2.0, 9.0), 4.6), squeeze=False, dpi=DPI,
                             layout="constrained")
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")  # left: clear of the legend column on the right
    return fig, list(zip(models, axes[0]))


def _legend(fig, sections: list[tuple[str, list]]):
    """One legend for the figure, on its right: a heading line per section, then (handle, label) pairs."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for heading, entries in sections:
        if not entries:
            continue
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(heading)
        for h, lab in entries:
            handles.append(h)
            labels.append(lab)
    leg = fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False, handlelength=2.2)
    for t, lab in zip(leg.get_texts(), labels):
        if any(lab == h for h, _ in sections):
            t.set_fontweight("bold")
    return leg


def _k_entries(ks):
    from matplotlib.patches import Patch

    return [(Patch(color=_k_color(k)), f"k = {k}") for k in ks]


def _marker_entries(kinds: dict):
    from matplotlib.lines import Line2D

    return [(Line2D([], [], linestyle="none", marker=m, color="0.35", markersize=6), str(name)) for name, m in kinds.items()]


def _variant_entries(variants: dict):
    from matplotlib.lines import Line2D

    if len(variants) < 2:
        return []
    return [(Line2D([], [], color="0.35", linestyle=ls, marker="o", markersize=5, markerfacecolor="0.35" if filled else "white"),
             name) for name, (ls, filled) in variants.items()]


def _dense_entry(rows):
    from matplotlib.lines import Line2D

    if any(r["dtype"] == "dense" and r["metric"] > 0 for r in rows):
        return [(Line2D([], [], color="black", linestyle="--", linewidth=1), "dense model (its metric)")]
    return []


def _freeze(fig):
    """Run the layout once and keep it: labels are placed in the final pixel positions, and savefig keeps them."""
    fig.canvas.draw()
    fig.set_layout_engine("none")


# ---- the figures -------------------------------------------------------------------------------------------

def dtype_figure(rows: list[dict], dtype: str):
    """One data type: colour = k, marker = block size, a line per k (and variant) through its block sizes."""
    cells = [r for r in rows if r["dtype"] == dtype]
    blocks = sorted({c["block_size"] for c in cells})
    markers = {b: BLOCK_MARKERS[i % len(BLOCK_MARKERS)] for i, b in enumerate(blocks)}
    title = (f"data type {dtype}: what each k gets from smaller blocks" if len(blocks) > 1
             else f"data type {dtype}, block size {blocks[0]}: the metric of each k")
    return _line_figure(rows, cells, title,
                        lambda c: markers[c["block_size"]], "marker: block size", {f"B = {b}": m for b, m in markers.items()})


def block_figure(rows: list[dict], block):
    """One block size: colour = k, marker = data type, a line per k (and variant) through the data types."""
    cells = [r for r in rows if r["dtype"] != "dense" and r["block_size"] == block]
    dtypes = list(dict.fromkeys(c["dtype"] for c in cells))
    title = (f"block size {block}: what each k gets from its data type (same bits)" if len(dtypes) > 1
             else f"block size {block}, data type {dtypes[0]}: the metric of each k")
    return _line_figure(rows, cells, title,
                        lambda c: _marker(c["dtype"]), "marker: data type", {d: _marker(d) for d in dtypes})


def _line_figure(rows, chosen, title, marker_of, marker_heading, marker_kinds):
    fig, panels = _panels(rows, title)
    variants = _variants([r for r in rows if r["dtype"] != "dense"])
    fields = _variant_fields([r for r in rows if r["dtype"] != "dense"])
    ks = sorted({c["bits"] for c in chosen})
    notes = []
    for model, ax in panels:
        mine = [r for r in rows if r["model"] == model]
        shown = [c for c in chosen if c["model"] == model]
        dense = next((r for r in mine if r["dtype"] == "dense"), None)
        _axes(ax, model, mine, shown, [dense["metric"]] if dense else [])
        for k in ks:
            for name, (ls, filled) in variants.items():
                pts = sorted((c for c in shown if c["bits"] == k and _variant(c, fields) == name),
                             key=lambda c: (c["total_bits"], c["metric"]))
                if not pts:
                    continue
                color = _k_color(k)
                ax.plot([p["total_bits"] for p in pts], [p["metric"] for p in pts], linestyle=ls, color=color, lw=1.4,
                        zorder=2)
                for p in pts:
                    ax.plot(p["total_bits"], p["metric"], linestyle="none", marker=marker_of(p), markersize=6, color=color,
                            markerfacecolor=color if filled else "white", markeredgewidth=1.2, zorder=3)
        _dense_reference(ax, dense, mine[0]["metric_name"])
        notes.append((ax, dense, mine[0]["metric_name"], [(c["total_bits"], c["metric"]) for c in shown if _on_log_axis(c)]))
    _legend(fig, [("colour: bits per weight", _k_entries(ks)), (marker_heading, _marker_entries(marker_kinds)),
                  ("line / fill: " + ", ".join(_variant_fields([r for r in rows if r["dtype"] != "dense"])),
                   _variant_entries(variants)),
                  ("reference", _dense_entry(rows))])
    _freeze(fig)
    for note in notes:
        _dense_note(*note)
    return fig


def frontier_figure(rows: list[dict]):
    """Every quantized cell (colour = k, marker = data type, faded when a cell with no more bits beats it), the
    Pareto frontier of the quantized cells as a step line, and a label at each frontier cell, none overlapping."""
    from matplotlib.lines import Line2D

    fig, panels = _panels(rows, "Pareto frontier: the best configuration for each budget of total model bits")
    quantized = [r for r in rows if r["dtype"] != "dense"]
    variants = _variants(quantized)
    fields = _variant_fields(quantized)
    ks = sorted({c["bits"] for c in quantized})
    placements = []
    for model, ax in panels:
        mine = [r for r in rows if r["model"] == model]
        cells = [r for r in mine if r["dtype"] != "dense"]
        dense = next((r for r in mine if r["dtype"] == "dense"), None)
        front = frontier(cells)
        on = {id(c) for c in front}
        _axes(ax, model, mine, cells, [dense["metric"]] if dense else [])
        for c in cells:
            color = _k_color(c["bits"])
            filled = variants[_variant(c, fields)][1]
            best = id(c) in on
            ax.plot(c["total_bits"], c["metric"], linestyle="none", marker=_marker(c["dtype"]), markersize=6 if best else 5,
                    color=color, markerfacecolor=color if filled else "white", alpha=1.0 if best else 0.35,
                    markeredgecolor="black" if best and filled else color, markeredgewidth=0.8 if filled else 1.2,
                    zorder=3 if best else 2)
        ax.step([c["total_bits"] for c in front], [c["metric"] for c in front], "-", color="tab:red", where="post",
                lw=1.3, zorder=1, gid="frontier")
        reserved = _dense_reference(ax, dense, mine[0]["metric_name"])
        labelled = [c for c in front if _on_log_axis(c)]
        placements.append((ax, labelled, reserved, [c for c in cells if _on_log_axis(c)], dense))
    _legend(fig, [("colour: bits per weight", _k_entries(ks)),
                  ("marker: data type", _marker_entries({d: _marker(d) for d in dict.fromkeys(c["dtype"] for c in quantized)})),
                  ("line / fill: " + ", ".join(fields), _variant_entries(variants)),
                  ("cells", [(Line2D([], [], color="tab:red", lw=1.3), "Pareto frontier (labelled:\nk, block size B, data type)"),
                             (Line2D([], [], linestyle="none", marker="o", color="0.35", markeredgecolor="black"), "frontier cell"),
                             (Line2D([], [], linestyle="none", marker="o", color="0.35", alpha=0.35), "beaten cell")]
                   + _dense_entry(rows))])
    _freeze(fig)
    for ax, labelled, reserved, cells, dense in placements:
        points = [(c["total_bits"], c["metric"]) for c in cells]
        reserved = reserved + _dense_note(ax, dense, rows[0]["metric_name"] if dense is None else dense["metric_name"],
                                          points)
        place_labels(ax, [(c["total_bits"], c["metric"]) for c in labelled], [short_label(c, rows) for c in labelled],
                     reserved, points)
    return fig


# ---- labels that do not overlap ----------------------------------------------------------------------------

# directions tried around a point, nearest first: (dx, dy) in units of the distance
def _save(fig, out: str, stem: str) -> str:
    rel = os.path.join("plots", f"{stem}.png")
    path = os.path.join(out, rel)
    with AtomicOutput(path, folder=False, force=True) as o:
        fig.savefig(o.tmp, dpi=DPI, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return rel
