"""YAML with limits: recipes, finetune recipes and study files are small hand-written files, so anything much
bigger is refused before it is built.

PyYAML's safe loader runs no code, but it still expands aliases: a 1 KB file of nested `*a` references
("billion laughs") stands for billions of nodes, and everything that walks or prints the result (checks,
error messages, JSON output) then takes minutes and gigabytes. We compose the node graph first (linear in
the file: an alias is one shared node), measure it as if every alias were expanded (memoized per node, so
the measuring is linear too), and build Python objects only when it is small.
"""

from __future__ import annotations

import yaml

from kbitcli.errors import KbitError, bad_input

MAX_BYTES = 1 << 20  # 1 MB: the largest shipped recipe is under 2 KB
MAX_NODES = 100_000  # values after alias expansion
MAX_DEPTH = 64  # nesting levels (a recipe uses about 4)


class _TooBig(Exception):
    pass


def load(text: str, path: str):
    """yaml.safe_load(text), refusing (exit 2, naming path) what exceeds the limits above."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            expanded_size(node)
        except _TooBig as e:
            raise bad_input(f"{path}: {e}; a recipe is a small file (write lists out, use few aliases)") from None
        return loader.construct_document(node)
    except RecursionError:  # the composer itself recurses once per level
        raise bad_input(f"{path}: nested more than {MAX_DEPTH} levels deep; a recipe is a small, flat file") from None
    except (yaml.YAMLError, KbitError):
        raise
    except Exception as e:
        # PyYAML's scanner and safe constructors raise plain ValueError / IndexError / KeyError / AttributeError,
        # not a YAMLError, on some malformed text: a "\U" escape past U+10FFFF, a tag the value does not fit
        # (`!!int bits`, `!!int ''`, `!!bool maybe`). They were "internal error"s.
        shown = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise bad_input(f"{path}: not valid YAML (a malformed escape, or a value that does not fit its tag: "
                        f"{shown})") from None
    finally:
        loader.dispose()


def expanded_size(root) -> int:
    """Nodes of the document with every alias expanded; _TooBig past MAX_NODES / MAX_DEPTH or on a cycle."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, height)
    path: set[int] = set()

    def visit(node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in done:
            size, height = done[key]
        else:
            if key in path:
                raise _TooBig("an alias refers to itself (a recursive structure)")
            if depth > MAX_DEPTH:
                raise _TooBig(f"nested more than {MAX_DEPTH} levels deep")
            path.add(key)
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            size, height = 1, 0
            for child in children:
                s, h = visit(child, depth + 1)
                size, height = size + s, max(height, h + 1)
                if size > MAX_NODES:
                    break
            path.discard(key)
            done[key] = (size, height)
        if size > MAX_NODES:
            raise _TooBig(f"more than {MAX_NODES:,} values once its aliases are expanded")
        if depth + height > MAX_DEPTH:
            raise _TooBig(f"nested more than {MAX_DEPTH} levels deep once its aliases are expanded")
        return size, height

    return visit(root, 0)[0]
