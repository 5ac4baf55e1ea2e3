"""The figures read at a glance: the scaling study's plots (kbitcli/bench/plots.py) are zoomed on the quantized
cells with the dense model as a labelled reference, every marker / colour / line style has a legend entry, tick
labels are readable, frontier labels never overlap; finetune's loss.png shows the merged model's eval loss.
Rows are built here (no study, no training): each test takes well under a second or two."""

from __future__ import annotations

import itertools
import json
import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from kbitcli.bench import plots  # noqa: E402
from kbitcli.bench.frontier import frontier  # noqa: E402
from kbitcli.finetune import curve  # noqa: E402

PARAMS = 260_000
DTYPE_PENALTY = {"nf": 1.0, "fp": 1.6, "int": 1.3}


def study_rows(model="stories260K", metric_name="kl", dense_metric=0.0, bits=range(2, 9), blocks=(32, 128),
               dtypes=("nf", "fp", "int"), methods=("rtn",), params=PARAMS):
    """Rows shaped like a study's results: total bits = quantized weights at k + fp16 scales + fp32 rest."""
    rest = params * 0.3 * 32
    rows = [{"model": model, "kind": "causal", "bits": None, "block_size": None, "dtype": "dense", "double_quant": None,
             "scale_search": None, "method": None, "total_bits": params * 32, "params": params,
             "bits_per_param_model": 32.0, "metric_name": metric_name, "metric": dense_metric}]
    for k, b, dt, m in itertools.product(bits, blocks, dtypes, methods):
        total = int(params * 0.7 * (k + 16 / b) + rest) + (2 ** k * 16 if dt != "int" else 0)
        err = 8.0 * 4.0 ** (2 - k) * (1 + 32 / b) / 2 * DTYPE_PENALTY[dt] * (0.6 if m == "gptq" else 1.0)
        rows.append({"model": model, "kind": "causal", "bits": k, "block_size": b, "dtype": dt, "double_quant": False,
                     "scale_search": 1, "method": m, "total_bits": total, "params": params,
                     "bits_per_param_model": total / params, "metric_name": metric_name,
                     "metric": dense_metric + err if dense_metric else err})
    return rows


def panels(fig, rows):
    """The figure's model panels (not the top bits-per-parameter axes), by model name."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title() in models}


def legend_of(fig):
    assert len(fig.legends) == 1, "one legend for the whole figure"
    leg = fig.legends[0]
    return list(zip(leg.legend_handles, [t.get_text() for t in leg.get_texts()]))


def used_markers(ax):
    """(marker, filled) of every marker drawn in a panel."""
    out = set()
    for line in ax.get_lines():
        if line.get_marker() not in (None, "None", "", " ") and len(line.get_xdata()):
            out.add((line.get_marker(), line.get_markerfacecolor() != "white"))
    return out


def text_boxes(fig, ax, gid):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return [(t.get_text(), Text.get_window_extent(t, r)) for t in ax.texts if t.get_gid() == gid]


def assert_no_overlap(boxes):
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"labels {a!r} and {b!r} overlap"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---- the frontier ------------------------------------------------------------------------------------------

def test_frontier_zooms_on_quantized_cells_and_notes_the_dense_reference():
    rows = study_rows() + study_rows(model="MiniLM", metric_name="1-cosine", params=22_000_000)
    fig = plots.frontier_figure(rows)
    for model, ax in panels(fig, rows).items():
        mine = [r for r in rows if r["model"] == model]
        dense = next(r for r in mine if r["dtype"] == "dense")
        quant = [r for r in mine if r["dtype"] != "dense"]
        lo, hi = ax.get_xlim()
        assert lo <= min(r["total_bits"] for r in quant) and max(r["total_bits"] for r in quant) <= hi
        assert hi < dense["total_bits"] / 2, "the axis is not stretched to the dense point"
        assert ax.get_ylim()[0] <= min(r["metric"] for r in quant)
        # kl / 1-cosine are 0 for dense: it is named in a note, not drawn on the log axis
        notes = [t.get_text() for t in ax.texts if t.get_gid() == "dense"]
        assert len(notes) == 1 and "dense" in notes[0] and "= 0" in notes[0]
        # the frontier is the quantized cells' one, every frontier cell labelled
        front = frontier(quant)
        step = next(line for line in ax.get_lines() if line.get_gid() == "frontier")
        assert list(step.get_xdata()) == [c["total_bits"] for c in front]
        labels = {tuple(t.xy): t.get_text() for t in ax.texts if t.get_gid() == "frontier-label"}
        assert labels == {(c["total_bits"], c["metric"]): plots.short_label(c, rows) for c in front}


def test_frontier_nll_draws_the_dense_line_labelled_inside_the_zoomed_axes():
    rows = study_rows(metric_name="nll", dense_metric=1.197, bits=[3, 4, 5, 6, 8], dtypes=("nf", "int"))
    fig = plots.frontier_figure(rows)
    (ax,) = panels(fig, rows).values()
    assert ax.get_xlim()[1] < PARAMS * 32 / 2
    lines = [line for line in ax.get_lines() if line.get_gid() == "dense"]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == [1.197, 1.197]
    lo, hi = ax.get_ylim()
    assert lo < 1.197 < hi
    label = [t.get_text() for t in ax.texts if t.get_gid() == "dense"]
    assert len(label) == 1 and "1.197" in label[0] and "dense" in label[0]
    assert any("dense" in text for _, text in legend_of(fig))


@pytest.mark.parametrize("kind", ["kl", "nll", "gptq"])
def test_frontier_labels_do_not_overlap_each_other_or_the_dense_label(kind):
    if kind == "kl":
        rows = study_rows()
    elif kind == "nll":  # near-dense cells crowd onto the dense line: the hard case
        rows = study_rows(metric_name="nll", dense_metric=1.197, bits=[3, 4, 5, 6, 8])
    else:
        rows = study_rows(bits=[2, 3, 4], blocks=(64, 128), dtypes=("nf", "int"), methods=("rtn", "gptq"))
    fig = plots.frontier_figure(rows)
    (ax,) = panels(fig, rows).values()
    labels = text_boxes(fig, ax, "frontier-label")
    assert len(labels) == len(frontier([r for r in rows if r["dtype"] != "dense"])) >= 3
    assert_no_overlap(labels + text_boxes(fig, ax, "dense"))
    inside = ax.get_window_extent(fig.canvas.get_renderer())
    for text, box in labels:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, text


def test_frontier_legend_names_every_marker_colour_and_line():
    rows = study_rows(bits=[2, 3, 4], blocks=(64, 128), dtypes=("nf", "int"), methods=("rtn", "gptq"))
    fig = plots.frontier_figure(rows)
    (ax,) = panels(fig, rows).values()
    entries = legend_of(fig)
    texts = [t for _, t in entries]
    # circle vs triangle: data type; filled vs hollow: method
    for dt in ("nf", "int"):
        assert dt in texts
    assert {"rtn", "gptq"} <= set(texts)
    shapes = {m for m, _ in used_markers(ax)}
    assert shapes <= {h.get_marker() for h, _ in entries if isinstance(h, Line2D)}
    assert {f for _, f in used_markers(ax)} <= {h.get_markerfacecolor() != "white" for h, t in entries
                                                 if t in ("rtn", "gptq")}
    # every colour is a k in the legend
    colours = {to_rgba(line.get_color()) for line in ax.get_lines() if line.get_gid() is None}
    legend_colours = {to_rgba(h.get_facecolor()) for h, t in entries if isinstance(h, Patch) and t.startswith("k = ")}
    assert colours <= legend_colours
    assert [t for t in texts if t.startswith("k = ")] == ["k = 2", "k = 3", "k = 4"]
    assert any("frontier" in t.lower() for t in texts)


def test_tick_labels_are_plain_and_cover_the_zoomed_range():
    for rows in (study_rows(), study_rows(metric_name="nll", dense_metric=1.197, bits=[3, 4, 5, 6, 8])):
        fig = plots.frontier_figure(rows)
        (ax,) = panels(fig, rows).values()
        fig.canvas.draw()
        for axis, (lo, hi) in ((ax.yaxis, ax.get_ylim()), (ax.xaxis, ax.get_xlim())):
            locs = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
            labels = [axis.get_major_formatter()(t, i) for i, t in enumerate(locs)]
            assert len(locs) >= 3 and all(labels), (locs, labels)
            assert not any("$" in s or "^" in s for s in labels), labels  # 0.01, not 10^{-2}
            assert axis.get_minor_locator()() == [] or len(axis.get_minor_locator()()) == 0  # no unlabelled ticks
            # the labelled ticks span most of the zoomed range (no long unlabelled stretch at either end)
            span = math.log10(hi / lo)
            assert math.log10(locs[-1] / locs[0]) >= 0.45 * span, (locs, lo, hi)


def test_log_ticks_are_round_and_labelled_at_every_range():
    for lo, hi in ((1e-4, 8), (1.15, 4.3), (2.1, 4.1), (1.19, 1.25), (3e-4, 3e-3), (0.02, 1.1)):
        ticks = plots._log_ticks(lo, hi)
        assert 3 <= len(ticks) <= 9 and all(lo <= t <= hi for t in ticks), (lo, hi, ticks)
        assert all(len(f"{t:g}") <= 7 for t in ticks), ticks


# ---- the dtype and block figures ---------------------------------------------------------------------------

def test_dtype_figure_markers_are_block_sizes_in_the_legend_and_dense_is_off_the_axis():
    rows = study_rows()
    fig = plots.dtype_figure(rows, "nf")
    (ax,) = panels(fig, rows).values()
    entries = legend_of(fig)
    assert {"B = 32", "B = 128"} <= {t for _, t in entries}
    assert {m for m, _ in used_markers(ax)} <= {h.get_marker() for h, _ in entries if isinstance(h, Line2D)}
    assert ax.get_xlim()[1] < PARAMS * 32 / 2
    assert [t.get_gid() for t in ax.texts] == ["dense"]


def test_one_block_dtype_figure_has_no_line_legend_for_dots():
    """One block size: one point per k, so no line is drawn and the legend shows no line either."""
    rows = study_rows(blocks=(128,))
    fig = plots.dtype_figure(rows, "nf")
    (ax,) = panels(fig, rows).values()
    entries = legend_of(fig)
    for h, t in entries:
        if isinstance(h, Line2D) and t not in ("rtn", "gptq"):
            assert h.get_linestyle() in ("None", "none", ""), f"legend entry {t!r} shows a line"
    assert "smaller blocks" not in fig._suptitle.get_text() and "128" in fig._suptitle.get_text()


def test_block_figure_legend_names_the_data_type_markers():
    rows = study_rows()
    fig = plots.block_figure(rows, 32)
    (ax,) = panels(fig, rows).values()
    entries = legend_of(fig)
    assert {"nf", "fp", "int"} <= {t for _, t in entries}
    assert {m for m, _ in used_markers(ax)} == {"o", "s", "^"}
    assert {m for m, _ in used_markers(ax)} <= {h.get_marker() for h, _ in entries if isinstance(h, Line2D)}


def test_plot_all_writes_every_figure(tmp_path):
    rows = study_rows(bits=[2, 4], blocks=(64,), dtypes=("nf", "int"))
    figures = plots.plot_all(str(tmp_path), rows)
    assert figures == ["plots/dtype-nf.png", "plots/dtype-int.png", "plots/block-64.png", "plots/frontier.png"]
    for f in figures:
        with open(tmp_path / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums(), "figures are closed after saving"


# ---- finetune's loss.png -----------------------------------------------------------------------------------

def training_log(steps=40, eval_every=10, start=3.0, end=1.2):
    recs = []
    for s in range(1, steps + 1):
        recs.append({"step": s, "loss": start + (end - start) * s / steps, "lr": 1e-3})
    recs += [{"step": s, "eval_loss": start + (end - start) * s / steps - 0.1} for s in range(0, steps + 1, eval_every)]
    return sorted(recs, key=lambda r: r["step"])


def test_loss_figure_draws_the_merged_eval_loss_labelled_at_the_last_step():
    recs = training_log()
    fig = curve.loss_figure(recs, "LoRA r=4", merged={"kbit": {"path": "x/merged-kbit", "merged": 35, "eval_loss": 1.25}})
    ax = fig.axes[0]
    (marker,) = [line for line in ax.get_lines() if line.get_gid() == "merged-kbit"]
    assert list(marker.get_xdata()) == [40] and list(marker.get_ydata()) == [1.25]
    (label,) = [t for t in ax.texts if t.get_gid() == "merged-kbit"]
    assert "merged kbit" in label.get_text() and "1.25" in label.get_text()
    assert label.xy == (40, 1.25)
    assert ax.get_xlim()[1] > 40, "room to the right of the last step for the labels"
    assert any("merged-kbit" in t.get_text() for t in ax.get_legend().get_texts())
    # the adapter's own final eval loss is labelled beside it, and the two labels do not overlap
    assert_no_overlap(text_boxes(fig, ax, "merged-kbit") + text_boxes(fig, ax, "adapter-eval"))


def test_loss_figure_labels_stay_apart_when_merged_equals_the_adapter_eval():
    recs = training_log()
    last = recs[-1]["eval_loss"] if "eval_loss" in recs[-1] else [r for r in recs if "eval_loss" in r][-1]["eval_loss"]
    fig = curve.loss_figure(recs, "t", merged={"kbit": {"eval_loss": last}, "dense": {"eval_loss": last + 1e-4}})
    ax = fig.axes[0]
    boxes = text_boxes(fig, ax, "merged-kbit") + text_boxes(fig, ax, "merged-dense") + text_boxes(fig, ax, "adapter-eval")
    assert len(boxes) == 3
    assert_no_overlap(boxes)


def test_loss_figure_without_merged_eval_draws_nothing_extra():
    for merged in (None, {}, {"kbit": {"path": "p", "merged": 35}}):  # no --merge, or no --eval-data
        fig = curve.loss_figure(training_log(), "t", merged=merged)
        ax = fig.axes[0]
        assert not [a for a in ax.get_lines() + ax.texts if (a.get_gid() or "").startswith("merged")]
        plt.close(fig)


def test_replot_reads_the_run_summary(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in training_log()) + '{"step": 4')
    summary = {"model": "/m/s260-nf4", "steps": 40, "rank": 4, "merged": {"kbit": {"eval_loss": 1.3, "merged": 35}}}
    (out / "finetune_run.json").write_text(json.dumps({"status": "done", "summary": summary}))
    path = curve.replot(str(out))
    assert path == os.path.join(str(out), "loss.png")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # the same call plot_loss made before (three arguments) still works
    curve.plot_loss(training_log(), str(tmp_path / "plain.png"), "t")
    assert (tmp_path / "plain.png").exists()
