"""The allocation: each tensor t takes one choice c of cost[t][c] (exact bits) and predicted loss[t][c]; minimise
the summed loss with the summed cost at most the budget (a multiple-choice knapsack).

1. Lagrangian relaxation: for a price lambda per bit every tensor independently takes the choice minimising
   loss + lambda * cost, which is always a vertex of its lower convex hull of (cost, loss). The total cost falls
   as lambda grows; bisection finds the smallest lambda whose solution fits. That solution is optimal for the
   budget it spends (a point on the convex frontier), but may leave up to one hull step unspent.
2. Greedy fill: while some single change lowers the loss and fits in what is left, make the one with the
   largest loss saved per extra bit (changes that cost nothing or save bits come first). The result never
   exceeds the budget, and in practice lies within a fraction of a block of it.
A choice a tensor cannot take (a block larger than the tensor) has cost None.
"""

from __future__ import annotations

import numpy as np

from kbitcli.errors import bad_input

INF = float("inf")


def lower_hull(costs: list[float], losses: list[float]) -> list[int]:
    """Indices of the lower convex hull of the points (cost, loss), by increasing cost and strictly decreasing
    loss: the only choices a Lagrangian price can select. Dominated and non-convex points are dropped."""
    pts = sorted((c, l, i) for i, (c, l) in enumerate(zip(costs, losses)) if c is not None)
    hull: list[tuple] = []
    for c, l, i in pts:
        if hull and l >= hull[-1][1]:  # costs at least as much, no better: dominated
            continue
        while hull and hull[-1][0] == c:  # same cost, lower loss: replaces it
            hull.pop()
        while len(hull) >= 2:
            (c1, l1, _), (c2, l2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the segment from hull[-2] to (c, l)
            if (l2 - l1) * (c - c1) >= (l - l1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append((c, l, i))
    return [i for _, _, i in hull]


def _matrices(costs, losses):
    width = max(len(r) for r in costs)
    C = np.full((len(costs), width), INF)
    L = np.full((len(costs), width), INF)
    for t, (cr, lr) in enumerate(zip(costs, losses)):
        for c, (cost, loss) in enumerate(zip(cr, lr)):
            if cost is not None:
                C[t, c], L[t, c] = cost, loss
    return C, L


def limits(costs) -> tuple[float, float]:
    """(cheapest, richest) total cost: every tensor at its cheapest / at its most expensive possible choice."""
    lo = sum(min(c for c in r if c is not None) for r in costs)
    hi = sum(max(c for c in r if c is not None) for r in costs)
    return lo, hi


def _pick(C, L, hull_mask, lam):
    score = np.where(hull_mask, L + lam * C, INF)
    return score.argmin(axis=1)


def solve(costs: list[list[float | None]], losses: list[list[float]], budget: float) -> list[int]:
    """The chosen index per tensor. bad_input when even the cheapest choice of every tensor does not fit."""
    if not costs:
        return []
    C, L = _matrices(costs, losses)
    if np.isinf(C).all(axis=1).any():
        raise bad_input("a tensor has no choice that fits it (every block is larger than the tensor)")
    lo, _ = limits(costs)
    if lo > budget:
        raise bad_input(f"budget of {budget:,.0f} bits is below the cheapest plan ({lo:,.0f} bits)")
    rows = np.arange(len(costs))
    hull_mask = np.zeros_like(C, dtype=bool)
    for t in range(len(costs)):
        hull_mask[t, lower_hull(list(C[t]), list(L[t]))] = True  # inf costs sort last and never join
    hull_mask &= np.isfinite(C)

    def total(pick):
        return C[rows, pick].sum()

    hi = 1.0
    while total(_pick(C, L, hull_mask, hi)) > budget and hi < 1e300:
        hi *= 4
    lo_l = 0.0
    best = _pick(C, L, hull_mask, hi)
    if total(_pick(C, L, hull_mask, 0.0)) <= budget:
        best = _pick(C, L, hull_mask, 0.0)
    else:
        for _ in range(200):  # bisection in lambda; the solution is a step function of it
            mid = (lo_l + hi) / 2
            p = _pick(C, L, hull_mask, mid)
            if total(p) <= budget:
                hi, best = mid, p
            else:
                lo_l = mid
            if hi - lo_l <= 1e-12 * hi:
                break
    return list(map(int, greedy_fill(C, L, best, budget)))


def greedy_fill(C, L, pick, budget):
    """Spend what the Lagrangian solution left: one change at a time, the most loss saved per extra bit."""
    pick = pick.copy()
    rows = np.arange(len(pick))
    while True:
        slack = budget - C[rows, pick].sum()
        dc = C - C[rows, pick][:, None]
        dl = L[rows, pick][:, None] - L
        ok = (dl > 0) & (dc <= slack) & np.isfinite(C)
        if not ok.any():
            return pick
        # free or bit-saving improvements first (infinite ratio), then the best loss saved per bit
        ratio = np.where(ok, np.where(dc <= 0, INF, dl / np.maximum(dc, 1e-300)), -INF)
        gain = np.where(ok & (dc <= 0), dl, -INF)
        if np.isinf(ratio).any() and (ratio == INF).any():
            t, c = np.unravel_index(np.argmax(gain), gain.shape)
        else:
            t, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        pick[t] = c
