"""loss.png: training loss per step (and its running mean) with the eval losses on top."""

from __future__ import annotations

import json

from kbitcli.finetune.atomic import atomic_path


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


def plot_loss(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.4, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
