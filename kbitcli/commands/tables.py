"""Tables for people: tensor names in natural order, per-layer tensors grouped by role, one row per line in logs.

A model repeats the same tensors in every layer (`model.layers.0.mlp.down_proj.weight` ... `model.layers.29...`):
printed one by one that is hundreds of rows saying the same thing. `group_rows` folds them into one row per role
(`model.layers.*.mlp.down_proj.weight`, layers `0-29`) and per setting, so an override on some layers stays a
row of its own; `natural_key` sorts `layers.2` before `layers.10`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key comparing the runs of digits in `name` as numbers: layers.2 < layers.10 < layers.10.mlp.
    re.split with a capturing group alternates text (even positions) and digits (odd positions), so two keys
    never compare a number with a string."""
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def natural_sorted(rows: list[dict], key: str = "name") -> list[dict]:
    return sorted(rows, key=lambda r: natural_key(r[key]))


def role(name: str) -> tuple[str, tuple[int, ...]]:
    """(name with every numeric component replaced by `*`, those numbers): the role a tensor plays in each layer.
    'model.layers.3.mlp.down_proj.weight' -> ('model.layers.*.mlp.down_proj.weight', (3,)); a name with no
    numeric component (embeddings, final norm) is its own role."""
    parts = name.split(".")
    idx = tuple(int(p) for p in parts if p.isdigit())
    return ".".join("*" if p.isdigit() else p for p in parts), idx


def ranges(values) -> str:
    """Sorted distinct integers as compact ranges: [0, 1, 2, 3, 5, 7, 8] -> '0-3,5,7-8'."""
    vs = sorted(set(values))
    out, i = [], 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        out.append(str(vs[i]) if i == j else f"{vs[i]}-{vs[j]}")
        i = j + 1
    return ",".join(out)


@dataclass
class Group:
    """Tensors of one role with the same settings: what one summary row says."""

    name: str  # the role, e.g. model.layers.*.mlp.down_proj.weight
    rows: list[dict] = field(default_factory=list)
    indices: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def layers(self) -> str:
        """The range of each numeric position: '0-29' (layers), '0-29 / 0-63' (layers / experts), '-' for none."""
        if not self.indices or not self.indices[0]:
            return "-"
        width = min(len(i) for i in self.indices)
        return " / ".join(ranges(i[p] for i in self.indices) for p in range(width))

    @property
    def shapes(self) -> list[list[int]]:
        seen = []
        for r in self.rows:
            if list(r["shape"]) not in seen:
                seen.append(list(r["shape"]))
        return seen

    @property
    def first(self) -> dict:
        return self.rows[0]

    def bits_per_param(self) -> float:
        """Over the whole group (bytes written / parameters), so groups of mixed shapes are exact."""
        numel = sum(_numel(r["shape"]) for r in self.rows)
        if all("bytes_out" in r for r in self.rows) and numel:
            return sum(r["bytes_out"] for r in self.rows) * 8 / numel
        return self.first["bits_per_param"]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# what must be equal for tensors of one role to share a row: a per-layer override is a row of its own
SETTING_KEYS = ("quantized", "bits", "block_size", "data_type", "double_quant", "scale_dtype", "method", "dtype", "rule")


def group_rows(rows: list[dict]) -> list[Group]:
    """Plan rows (dicts with name, shape, and the settings of SETTING_KEYS) folded into one Group per role and
    setting. Roles come in natural order of first appearance (embeddings, layers.*.…, final norm), and the
    groups of one role (e.g. layers 0-9 at k=4 and 10-29 at k=8 after an override) next to each other."""
    roles: dict[str, dict[tuple, Group]] = {}
    for r in natural_sorted(rows):
        name, idx = role(r["name"])
        setting = tuple(str(r.get(k)) for k in SETTING_KEYS)
        g = roles.setdefault(name, {}).setdefault(setting, Group(name))
        g.rows.append(r)
        g.indices.append(idx)
    return [g for by_setting in roles.values() for g in by_setting.values()]


def print_table(con, table) -> None:
    """Print `table` whole: on a terminal as the terminal's width allows; elsewhere (a CI log, a pipe, where rich
    assumes 80 columns) as wide as the table needs, so each row stays on one line and no name is folded."""
    if not con.is_terminal:
        from rich.measure import Measurement

        need = Measurement.get(con, con.options.update_width(100_000), table).maximum
        if need > con.width:
            con.width = need
    con.print(table)
