"""Text labels that do not overlap: each label is tried at growing distances in a fixed set of directions from its
point, and the first place whose box (in display pixels, as the renderer measures it) clears every label placed
so far, every marker and the panel's edges wins; a label placed away from its point gets a thin leader line."""

from __future__ import annotations

import numpy as np

LABEL_FONTSIZE = 7

_DIRS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 2), (-1, 2), (1, -2), (-1, -2),
         (2, 1), (-2, 1), (2, -1), (-2, -1))
_DISTS = (5, 9, 16, 26, 38, 52, 68, 86, 106)


def place_labels(ax, points, texts, reserved=(), obstacles=(), fontsize=LABEL_FONTSIZE):
    """Annotate each point (data coordinates) with its text, greedily: of the positions tried around the point
    the cheapest one that overlaps no placed label or reserved artist and stays inside the axes, preferring
    positions that cover no marker or frontier line and lie close; far labels get a thin leader line.
    Call after the layout is final (see _freeze). Returns the annotations."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    px_per_pt = fig.dpi / 72.0
    placed = [a.get_window_extent(renderer).padded(2) for a in reserved if hasattr(a, "get_text")]
    obs = [tuple(ax.transData.transform(p)) for p in obstacles]
    for line in ax.get_lines():  # the frontier step line and the dense line, sampled every few pixels
        if line.get_gid() == "dense":
            y = ax.transData.transform((1.0, line.get_ydata()[0]))[1]
            obs += [(x, y) for x in range(int(box.x0), int(box.x1), 4)]
        if line.get_gid() != "frontier":
            continue
        verts = ax.transData.transform(_step_vertices(line))
        for (xa, ya), (xb, yb) in zip(verts[:-1], verts[1:]):
            n = max(1, int(max(abs(xb - xa), abs(yb - ya)) / 4))
            obs += [(xa + (xb - xa) * i / n, ya + (yb - ya) * i / n) for i in range(n + 1)]
    anchors = [tuple(ax.transData.transform(p)) for p in points]
    obs_xy, anchor_xy = np.array(obs, dtype=float).reshape(-1, 2), np.array(anchors, dtype=float).reshape(-1, 2)
    # the points nearest the edges of the axes have the fewest free positions around them: they go first
    order = sorted(range(len(points)), key=lambda i: min(anchors[i][0] - box.x0, box.x1 - anchors[i][0],
                                                          anchors[i][1] - box.y0, box.y1 - anchors[i][1]))
    out = {}
    for i in order:
        (x, y), (px, py), s = points[i], anchors[i], texts[i]
        probe = ax.text(0, 0, s, fontsize=fontsize)
        bb = probe.get_window_extent(renderer)
        probe.remove()
        w, h = bb.width, bb.height
        best = None
        for d in _DISTS:
            for dx, dy in _DIRS:
                ox, oy = dx * d * px_per_pt, dy * d * px_per_pt
                x0 = px + ox - (w if dx < 0 else w / 2 if dx == 0 else 0)
                y0 = py + oy - (h if dy < 0 else h / 2 if dy == 0 else 0)
                cand = Bbox.from_bounds(x0, y0, w, h)
                cx, cy = x0 + w / 2, y0 + h / 2  # a leader runs from the point towards the label's centre
                leader = [(px + (cx - px) * i / 16, py + (cy - py) * i / 16) for i in range(1, 16)]
                cost = (1e6 * sum(cand.overlaps(p) for p in placed)
                        + 2e3 * any(p.contains(lx, ly) for p in placed for lx, ly in leader)
                        + 1e5 * (not (box.x0 + 2 <= cand.x0 and cand.x1 <= box.x1 - 2 and box.y0 + 2 <= cand.y0
                                       and cand.y1 <= box.y1 - 2))
                        + 30 * _inside(obs_xy, cand, 3, (px, py))
                        + 1e4 * _inside(anchor_xy, cand, 3, (px, py))
                        + d * (1.0 + 0.15 * (abs(dx) + abs(dy))))
                # a label nearer another point than its own reads as that point's: prefer others, else a leader
                own = _gap(cand, px, py)
                ambiguous = any(_gap(cand, ax_, ay_) < own for ax_, ay_ in anchors if (ax_, ay_) != (px, py))
                cost += 200 * ambiguous
                if best is None or cost < best[0]:
                    best = (cost, ox / px_per_pt, oy / px_per_pt, dx, dy, d, cand, ambiguous)
        _, ox, oy, dx, dy, d, cand, ambiguous = best
        ann = ax.annotate(s, (x, y), xytext=(ox, oy), textcoords="offset points", fontsize=fontsize,
                          ha="right" if dx < 0 else "center" if dx == 0 else "left",
                          va="top" if dy < 0 else "center" if dy == 0 else "bottom", gid="frontier-label",
                          arrowprops=dict(arrowstyle="-", color="0.3", lw=0.6, shrinkA=0, shrinkB=3) if ambiguous or abs(ox) + abs(oy) > 9 else None)
        ann.set_in_layout(False)
        placed.append(cand.padded(1))
        out[i] = ann
    return [out[i] for i in range(len(points))]


def _inside(xy, bbox, pad: float, own) -> int:
    """How many of the points xy (an (n, 2) array, pixels) lie in bbox grown by pad, not counting `own`."""
    hit = ((xy[:, 0] >= bbox.x0 - pad) & (xy[:, 0] <= bbox.x1 + pad) & (xy[:, 1] >= bbox.y0 - pad)
           & (xy[:, 1] <= bbox.y1 + pad) & ~((xy[:, 0] == own[0]) & (xy[:, 1] == own[1])))
    return int(hit.sum())


def _gap(bbox, x, y) -> float:
    """Distance in pixels from a point to a box (0 inside)."""
    return float(np.hypot(max(bbox.x0 - x, 0.0, x - bbox.x1), max(bbox.y0 - y, 0.0, y - bbox.y1)))


def _step_vertices(line):
    """The corners of a where="post" step line, in data coordinates."""
    xs, ys = line.get_xdata(), line.get_ydata()
    pts = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        pts.append((x, y))
        if i + 1 < len(xs):
            pts.append((xs[i + 1], y))
    return pts
