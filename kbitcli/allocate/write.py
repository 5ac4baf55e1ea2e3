"""A plan as an ordinary recipe: the base recipe's settings and targets, then one override per planned tensor
naming it exactly, and a header comment saying what was asked and predicted. Its size is counted by the code
encode uses (plan.make_plan + kbit_write.shard_layout + planned_file_size: headers, shared tables, dense
tensors), so the predicted bytes are the bytes `kbit encode SRC DST --recipe plan.yaml` writes."""

from __future__ import annotations

import fnmatch
import re
from collections import Counter

import yaml

from kbitcli.recipes import Recipe, from_dict


def exact_pattern(name: str) -> str:
    """A pattern matching `name` and nothing else: the name itself when it holds no glob character."""
    if any(ch in name for ch in "*?[]"):
        return "re:" + re.escape(name)
    assert fnmatch.translate(name)  # a plain name is a glob that matches exactly itself
    return name


def recipe_dict(base: Recipe, assignment: dict[str, dict]) -> dict:
    """assignment: tensor name -> choice settings. The top-level settings are the most common choice (what a
    reader sees first); every planned tensor still gets its own override, so editing the top does not move it."""
    common = Counter(tuple(sorted(s.items())) for s in assignment.values()).most_common(1)
    top = dict(common[0][0]) if common else {}
    out = {k: v for k, v in base.settings().items() if v is not None and k not in ("scale_search",)}
    if base.scale_search is not None:
        out["scale_search"] = base.scale_search
    out.update(top)
    if base.targets is not None:
        out["targets"] = list(base.targets)
    if base.ignore:
        out["ignore"] = list(base.ignore)
    out["overrides"] = [{"pattern": exact_pattern(n), **s} for n, s in assignment.items()]
    return out


def recipe_text(data: dict, header: list[str]) -> str:
    head = "".join(f"# {line}\n" for line in header)
    settings = {k: v for k, v in data.items() if k != "overrides"}
    body = yaml.safe_dump(settings, sort_keys=False, default_flow_style=False)
    lines = ["overrides:"]
    for o in data["overrides"]:  # one override per line: a plan of 200 tensors stays readable and diffable
        lines.append("  - " + yaml.safe_dump(o, sort_keys=False, default_flow_style=True, width=10**6).strip())
    return head + body + "\n".join(lines) + "\n"


def parse_back(text: str, where: str = "plan") -> Recipe:
    """The recipe the YAML text describes, read exactly as `--recipe` reads it."""
    from kbitcli import safe_yaml

    return from_dict(safe_yaml.load(text, where), where)


def encoded_bytes(src, recipe: Recipe, max_shard_size) -> tuple[int, object]:
    """(bytes of the weight files encode writes for `recipe`, the encode plan), before any work."""
    from kbitcli.encode import plan_source
    from kbitcli.formats.kbit_write import shard_layout
    from kbitcli.io.safetensors_stream import planned_file_size
    from kbitcli.plan import parse_size

    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    plan = plan_source(src, recipe, limit if src.is_folder else None)
    return sum(planned_file_size(entries, md) for _, entries, md in (shard_layout(plan, s) for s in plan.shards)), plan
