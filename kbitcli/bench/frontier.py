"""The verdict of a scaling study: the Pareto frontier of cells (total model bits vs the metric, lower is better)
per model, and how cells are named in tables and plots."""

from __future__ import annotations

SAME_BUDGET = 1e-3  # totals within 0.1% are one budget: a 2^k-entry codebook table is not a reason to win


def frontier(cells: list[dict], tolerance: float = SAME_BUDGET) -> list[dict]:
    """The Pareto frontier (lower metric is better), cheapest first: per bit budget the best cell, kept when it
    beats every cheaper budget. Cells whose totals differ by less than `tolerance` (relative) share a budget,
    so a few bits of codebook do not decide between data types."""
    groups: list[list[dict]] = []
    for c in sorted(cells, key=lambda c: c["total_bits"]):
        if groups and c["total_bits"] <= groups[-1][0]["total_bits"] * (1 + tolerance):
            groups[-1].append(c)
        else:
            groups.append([c])
    best, out = float("inf"), []
    for g in groups:
        winner = min(g, key=lambda c: (c["metric"], c["total_bits"]))
        if winner["metric"] < best:
            out.append(winner)
            best = winner["metric"]
    return out


def describe_cell(c: dict, show_search: bool = False) -> str:
    if c["dtype"] == "dense":
        return "dense"
    return (f"k={c['bits']} block={c['block_size']} {c['dtype']}" + ("+dq" if c["double_quant"] else "")
            + (" gptq" if c.get("method") == "gptq" else "")
            + (" refit" if c.get("scale_refit") else "")
            + (f" search={c.get('scale_search')}" if show_search else ""))


def varies_search(cells: list[dict]) -> bool:
    """Name the scale search in labels only when the study compares several."""
    return len({c.get("scale_search") for c in cells if c["dtype"] != "dense"}) > 1


def verdict(cells: list[dict]) -> dict:
    """Per model: the frontier as bit budgets -> best configuration, and the best cell of each k."""
    out, search = {}, varies_search(cells)
    for name in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == name]
        front = frontier(mine)
        rows = []
        for i, c in enumerate(front):
            upto = front[i + 1]["total_bits"] if i + 1 < len(front) else None
            rows.append({"from_bits": c["total_bits"], "below_bits": upto, "config": describe_cell(c, search),
                         "bits_per_param_model": c["bits_per_param_model"], "metric_name": c["metric_name"],
                         "metric": c["metric"]})
        best_per_k = {}
        for c in mine:
            if c["bits"] is not None and (c["bits"] not in best_per_k or c["metric"] < best_per_k[c["bits"]]["metric"]):
                best_per_k[c["bits"]] = c
        out[name] = {"frontier": rows, "frontier_bits": sorted({c["bits"] for c in front if c["bits"] is not None}),
                     "best_per_k": {k: {"config": describe_cell(c, search), "total_bits": c["total_bits"],
                                        "metric": c["metric"]} for k, c in sorted(best_per_k.items())}}
    return out
