"""The plan at a glance: bits per parameter of every planned tensor against its layer, one line per role
(q_proj, k_proj, ..., down_proj), so where the budget went (which layers, which roles) shows in one picture."""

from __future__ import annotations

import re

from kbitcli.io.atomic import AtomicOutput

DPI = 110
_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_role(name: str) -> tuple[int | None, str]:
    """('model.layers.3.mlp.down_proj.weight') -> (3, 'mlp.down_proj'); a tensor outside the layers -> (None, name)."""
    m = _LAYER.search(name)
    if not m:
        return None, name.removesuffix(".weight")
    return int(m.group(1)), name[m.end():].removesuffix(".weight")


def bits_figure(rows: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles: dict[str, list[tuple[int, float]]] = {}
    outside = []
    for r in rows:
        layer, role = layer_and_role(r["name"])
        if layer is None:
            outside.append((role, r["bits_per_param"]))
        else:
            roles.setdefault(role, []).append((layer, r["bits_per_param"]))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^v<>PXh*"
    for i, (role, pts) in enumerate(sorted(roles.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], ms=4, lw=1.2,
                label=role, alpha=0.85)
    for j, (role, bits) in enumerate(outside):
        ax.axhline(bits, ls=":", lw=1, color="grey")
        ax.annotate(f"{role}: {bits:.2f}", (0, bits), fontsize=7, color="grey", va="bottom")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per parameter (codes + scales)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if roles:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def save_figure(rows: list[dict], title: str, path: str, force: bool) -> str:
    import matplotlib.pyplot as plt

    fig = bits_figure(rows, title)
    with AtomicOutput(path, folder=False, force=force) as out:
        fig.savefig(out.tmp, dpi=DPI, format="png")
    plt.close(fig)
    return path
