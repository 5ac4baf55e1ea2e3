"""loss.png: training loss per step (and its running mean) with the eval losses on top, and, once the adapter is
merged, the merged model's eval loss as a labelled marker at the last step (what finetune_run.json reports as
summary.merged.<kind>.eval_loss): the loss of the checkpoint that is actually shipped, beside the adapter's."""

from __future__ import annotations

import json
import os

from kbitcli.io.atomic import atomic_path

MERGED_MARKERS = {"kbit": "*", "dense": "D"}
MERGED_COLORS = {"kbit": "tab:red", "dense": "tab:purple"}


def read_log(path: str) -> list[dict]:
    """The records of train_log.jsonl; a torn last line (a crash mid-write) is skipped."""
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


def merged_losses(merged: dict | None) -> dict[str, float]:
    """{kind: eval loss} from a finetune summary's `merged` ({kind: {path, ..., eval_loss}}); kinds without an
    eval loss (no --eval-data) are left out."""
    return {kind: float(m["eval_loss"]) for kind, m in (merged or {}).items()
            if isinstance(m, dict) and m.get("eval_loss") is not None}


def loss_figure(records: list[dict], title: str, merged: dict | None = None, step: int | None = None):
    """The loss figure (not saved). merged: a summary's `merged` mapping; its eval losses are drawn at `step`
    (default: the last step of the log) as labelled markers. Every artist drawn for a merged model has
    gid 'merged-<kind>'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        xs, ys = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(xs, ys, lw=0.8, alpha=0.45, label="train loss")
        k = max(1, len(ys) // 20)
        if k > 1:
            smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1.6, label=f"train loss (mean of {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.4, color="tab:green",
                label="eval loss (base + adapter)")
    losses = merged_losses(merged)
    values = [r["loss"] for r in train] + [r["eval_loss"] for r in evals] + list(losses.values())
    if values and min(values) > 0 and max(values) / min(values) > 10:  # a loss that falls by decades (a small
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")                                            # set learned by heart): keep the end readable
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    if losses:
        steps = [r["step"] for r in records if "step" in r]
        at = step if step is not None else max(steps, default=0)
        last_eval = evals[-1]["eval_loss"] if evals and evals[-1]["step"] == at else None
        # labels to the right of the last step, in the room made for them; each is nudged away from the one
        # below it (and from the last adapter eval, labelled too) so that none overlap
        points = [(v, f"merged {kind}: {v:.4g}", kind) for kind, v in losses.items()]
        if last_eval is not None:
            points.append((last_eval, f"adapter: {last_eval:.4g}", None))
        for kind, v in losses.items():
            ax.plot([at], [v], linestyle="none", marker=MERGED_MARKERS.get(kind, "s"), markersize=11 if kind == "kbit" else 7,
                    color=MERGED_COLORS.get(kind, "tab:orange"), markeredgecolor="black", markeredgewidth=0.6,
                    zorder=5, gid=f"merged-{kind}", label=f"eval loss of merged-{kind}/ (adapter merged in)")
        lo, _ = ax.get_xlim()
        right = at + (at - lo) * 0.34 + 1
        ax.set_xlim(lo, right)
        ylo, yhi = ax.get_ylim()
        log = ax.get_yscale() == "log"
        fwd, back = (np.log10, lambda u: 10.0 ** u) if log else (lambda u: u, lambda u: u)
        gap = (fwd(yhi) - fwd(ylo)) * 0.06  # about one label's height, in axis units
        placed: list[float] = []
        for v, text, kind in sorted(points, key=lambda p: p[0]):
            y = max([fwd(v)] + [p + gap for p in placed])
            placed.append(y)
            y = back(y)
            ax.annotate(text, (at, v), xytext=(at + (right - at) * 0.12, y), textcoords="data", fontsize=8,
                        va="center", gid=f"merged-{kind}" if kind else "adapter-eval",
                        color=MERGED_COLORS.get(kind, "tab:orange") if kind else "tab:green",
                        arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6, shrinkA=1, shrinkB=5))
        if placed and placed[-1] > fwd(yhi) - gap:
            ax.set_ylim(ylo, back(placed[-1] + gap))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_loss(records: list[dict], path: str, title: str, merged: dict | None = None, step: int | None = None) -> None:
    """Write loss.png. merged: the run summary's `merged` ({kind: {..., eval_loss}}), drawn at the last step."""
    import matplotlib.pyplot as plt

    fig = loss_figure(records, title, merged, step)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def replot(out: str, plot_file: str = "loss.png", log_file: str = "train_log.jsonl",
           run_file: str = "finetune_run.json") -> str:
    """Redraw OUT/loss.png from OUT/train_log.jsonl and OUT/finetune_run.json, with the merged model's eval loss
    when the run's summary has it (a finished run with --merge and --eval-data). Returns the png's path."""
    with open(os.path.join(out, run_file)) as fh:
        run = json.load(fh)
    summary = run.get("summary") or {}
    model = summary.get("model") or run.get("model") or ""
    rank = summary.get("rank", (run.get("config") or {}).get("rank"))
    path = os.path.join(out, plot_file)
    plot_loss(read_log(os.path.join(out, log_file)), path,
              f"LoRA r={rank} on {os.path.basename(os.path.abspath(model)) if model else '?'}",
              merged=summary.get("merged"), step=summary.get("steps"))
    return path
