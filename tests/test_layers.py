"""The folder layout is the architecture: every import (module-level or inside a function) goes down the layers
below, never up, and the import graph has no cycles. A new module must be placed in a layer here."""

from __future__ import annotations

import ast
import os


ROOT = os.path.join(os.path.dirname(__file__), "..", "kbitcli")

# (module prefix, layer): the most specific prefix wins; lower layers never import higher ones
LAYERS = [
    ("kbitcli", 0), ("kbitcli.errors", 0), ("kbitcli.paths", 0), ("kbitcli.progress", 0), ("kbitcli.safe_yaml", 0),
    ("kbitcli.parallel", 0),
    ("kbitcli.io.dtypes", 1), ("kbitcli.core", 1),  # the quantization core; the dtype table is a leaf
    ("kbitcli.io", 2), ("kbitcli.recipes", 2), ("kbitcli.plan", 2),  # I/O that knows no format; what to quantize
    ("kbitcli.hf", 3),  # transformers helpers: config, model class, meta model, linear modules
    ("kbitcli.calibration", 4),  # runs the model block by block
    ("kbitcli.formats", 5),  # every on-disk format, behind the reader protocol and the writers dict
    ("kbitcli.models", 6),  # loading and running k-bit models
    ("kbitcli.encode", 7), ("kbitcli.decode", 7), ("kbitcli.inspect", 7), ("kbitcli.finetune", 7),
    ("kbitcli.bench", 7), ("kbitcli.allocate", 7),  # the operations (allocate: `kbit plan`)
    ("kbitcli.api", 8), ("kbitcli.commands", 8), ("kbitcli.__main__", 8),  # the Python API and the CLI
]


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.join(ROOT, "..")).removesuffix(".py").replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kbitcli"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    graph[m].add(target if target in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
        graph[m].discard(m)
    return graph


def test_every_module_has_a_layer():
    for m in modules():
        assert layer(m) is not None


def test_imports_go_down_the_layers():
    up = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
          for m, targets in import_graph().items() for t in targets if layer(t) > layer(m)]
    assert not up, "\n".join(up)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """An upward import (io -> formats) and the cycle it closes are both reported."""
    graph = import_graph()
    graph["kbitcli.io.folder"].add("kbitcli.formats.registry")
    up = [t for t in graph["kbitcli.io.folder"] if layer(t) > layer("kbitcli.io.folder")]
    assert up == ["kbitcli.formats.registry"]
    cycle = find_cycle(graph)
    assert cycle is not None and "kbitcli.io.folder" in cycle and "kbitcli.formats.registry" in cycle
