"""Recipes: plain YAML that says how to quantize a checkpoint, and the rules for matching tensor names.

    bits: 4                 # k, 2..8
    block_size: 64          # power of two 16..4096, or `row` (one scale per row) or `tensor`
    dtype: nf               # int | fp | nf | quantile | dynamic
    double_quant: true      # 8-bit scales in blocks of 256 (bitsandbytes style)
    scale_dtype: fp16       # fp16 | bf16 | fp32 (ignored with double_quant)
    scale_search: 1         # candidate scales tried per block (1 = plain absmax); see core/grid.py
    scale_refit: false      # true: each scale refit by least squares to its block's codes (data-free rtn only)
    method: rtn             # rtn | gptq (gptq needs --calib); overridable per tensor like the rest
    targets: [...]          # patterns of tensors to quantize; default: the 2-D weights of linear layers
    ignore: [...]           # patterns kept dense even if targeted
    overrides:              # ordered; the last match wins, key by key
      - pattern: 're:.*down_proj.*'
        bits: 5

A pattern is a glob (`model.layers.*.mlp.*`) or, prefixed `re:`, a Python regular expression; it must match
the whole tensor name or its module name (the tensor name without `.weight`). Every pattern must match at
least one tensor, so a typo is an error and not a silently dense model.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields, replace

import yaml

from kbitcli.core.blockwise import SCALE_DTYPES
from kbitcli.core.codebooks import DTYPES, MAX_BITS, MIN_BITS
from kbitcli.errors import bad_input

MIN_BLOCK, MAX_BLOCK = 16, 4096
SETTINGS = ("bits", "block_size", "dtype", "double_quant", "scale_dtype", "scale_search", "method", "scale_refit")
METHODS = ("rtn", "gptq")
# Tensors that are 2-D but are not linear-layer weights: kept dense unless a recipe targets them.
NOT_LINEAR = re.compile(r"(embed|wte|wpe|lm_head|norm|ln_|position|token_type|shared\.weight)", re.I)


@dataclass
class Override:
    pattern: str
    settings: dict  # subset of SETTINGS, or {"skip": True}

    def describe(self) -> str:
        return f"{self.pattern} -> " + ",".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass
class Recipe:
    bits: int = 4
    block_size: int | str = 64
    dtype: str = "nf"
    double_quant: bool = False
    scale_dtype: str = "fp16"
    scale_search: int | None = None  # candidate scales per block; 1 = plain absmax; None: see plan.auto_search
    method: str = "rtn"  # rtn (round to nearest) | gptq (needs calibration data)
    scale_refit: bool | None = None  # least-squares refit of each scale; None: see plan.auto_refit
    targets: list[str] | None = None  # None: default linear weights
    ignore: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    source: str = "defaults"  # where the recipe came from, for messages

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS}


RECIPE_KEYS = {f.name for f in fields(Recipe)} - {"source"}


def check_settings(settings: dict, where: str) -> dict:
    """Validate (and normalise) bits / block_size / dtype / double_quant / scale_dtype values."""
    out = dict(settings)
    if "bits" in out:
        b = out["bits"]
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise bad_input(f"{where}: bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {b!r}")
    if "block_size" in out:
        out["block_size"] = check_block(out["block_size"], where)
    for key in ("dtype", "scale_dtype", "method"):  # a list or mapping here is not a name: say so, not crash
        if key in out and not isinstance(out[key], str):
            raise bad_input(f"{where}: {key} must be a name, got {out[key]!r:.80}")
    if "dtype" in out and out["dtype"] not in DTYPES:
        raise bad_input(f"{where}: dtype {out['dtype']!r} is not one of {', '.join(DTYPES)}")
    if "double_quant" in out and not isinstance(out["double_quant"], bool):
        raise bad_input(f"{where}: double_quant must be true or false, got {out['double_quant']!r}")
    if out.get("scale_refit") is not None and not isinstance(out["scale_refit"], bool):
        raise bad_input(f"{where}: scale_refit must be true or false, got {out['scale_refit']!r}")
    if "scale_dtype" in out and out["scale_dtype"] not in SCALE_DTYPES:
        raise bad_input(f"{where}: scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {out['scale_dtype']!r}")
    if "method" in out and out["method"] not in METHODS:
        raise bad_input(f"{where}: method must be one of {', '.join(METHODS)}, got {out['method']!r}")
    if out.get("scale_search") is not None:
        n = out["scale_search"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise bad_input(f"{where}: scale_search must be an integer from 1 (plain absmax) to 16, got {n!r}")
    return out


def check_block(block, where: str) -> int | str:
    if isinstance(block, str) and block.strip().lower() in ("row", "tensor"):
        return block.strip().lower()
    try:
        b = int(block)
        if isinstance(block, float) and block != b:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise bad_input(f"{where}: block_size must be a power of two {MIN_BLOCK}..{MAX_BLOCK}, 'row' or 'tensor', got {block!r}") from None
    if not MIN_BLOCK <= b <= MAX_BLOCK or b & (b - 1):
        raise bad_input(
            f"{where}: block_size {b} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK}; "
            f"use e.g. 64 or 128, or 'row' / 'tensor'"
        )
    return b


def _patterns(value, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise bad_input(f"{where}: {key} must be a list of patterns (globs or 're:' regexes)")
    for p in value:
        compile_pattern(p, where)
    return list(value)


def compile_pattern(p: str, where: str = "pattern"):
    if p.startswith("re:"):
        try:
            return re.compile(p[3:])
        except re.error as e:
            raise bad_input(f"{where}: bad regular expression {p!r} ({e})") from None
    return re.compile(fnmatch.translate(p))


def matches(pattern: str, name: str) -> bool:
    rx = compile_pattern(pattern)
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    return bool(rx.fullmatch(name) or rx.fullmatch(module))


def from_dict(data, where: str) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise bad_input(f"{where}: a recipe is a YAML mapping of {', '.join(sorted(RECIPE_KEYS))}")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise bad_input(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; valid keys: {', '.join(sorted(RECIPE_KEYS))}")
    settings = check_settings({k: data[k] for k in SETTINGS if k in data}, where)
    overrides = []
    raw = data.get("overrides") or []
    if not isinstance(raw, list):
        raise bad_input(f"{where}: overrides must be a list of {{pattern: ..., bits: ...}} entries")
    for i, o in enumerate(raw):
        ow = f"{where}: overrides[{i}]"
        if not isinstance(o, dict) or "pattern" not in o:
            raise bad_input(f"{ow}: each override needs a 'pattern' and settings, e.g. {{pattern: 're:.*down_proj', bits: 5}}")
        extra = set(o) - set(SETTINGS) - {"pattern", "skip"}
        if extra:
            raise bad_input(f"{ow}: unknown key(s) {', '.join(sorted(map(str, extra)))}; valid: pattern, skip, {', '.join(SETTINGS)}")
        _patterns(o["pattern"], "pattern", ow)
        s = {k: v for k, v in o.items() if k != "pattern"}
        if s.get("skip") is not None and not isinstance(s["skip"], bool):
            raise bad_input(f"{ow}: skip must be true or false")
        if not s:
            raise bad_input(f"{ow}: says nothing to change for {o['pattern']!r}")
        overrides.append(Override(o["pattern"], check_settings(s, ow)))
    targets = _patterns(data["targets"], "targets", where) if data.get("targets") is not None else None
    return Recipe(**settings, targets=targets, ignore=_patterns(data.get("ignore"), "ignore", where),
                  overrides=overrides, source=where)


def read_yaml(path: str, what: str = "recipe", example: str = "recipes/"):
    """The parsed YAML of a recipe-like file; a missing, malformed or oversized file (bytes, alias expansion,
    depth: see safe_yaml.py) is one line naming it."""
    from kbitcli import safe_yaml

    try:
        with open(path, "rb") as fh:
            raw = fh.read(safe_yaml.MAX_BYTES + 1)  # bounded: a FIFO or /dev/zero has no size to check first
        if len(raw) > safe_yaml.MAX_BYTES:
            raise bad_input(f"{path}: larger than {safe_yaml.MAX_BYTES >> 20} MB; a {what} is a small text file "
                            f"(see {example})")
        return safe_yaml.load(raw.decode("utf-8"), path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise bad_input(f"{path}: {what} not found; see {example} for examples") from None
    except PermissionError:
        raise bad_input(f"{path}: {what} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise bad_input(f"{path}: not UTF-8 text; a {what} is a YAML text file (see {example})") from None
    except yaml.YAMLError as e:
        raise bad_input(f"{path}: not valid YAML ({str(e).splitlines()[0][:200]})") from None


def load_recipe(path: str | None) -> Recipe:
    if path is None:
        return Recipe()
    return from_dict(read_yaml(path), path)


def parse_override(text: str) -> Override:
    """CLI form: PATTERN=5 (bits), PATTERN=skip, or PATTERN=bits:5,dtype:fp,block_size:128."""
    where = f"--override {text!r}"
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise bad_input(f"{where}: expected PATTERN=BITS, PATTERN=skip or PATTERN=key:value,...")
    compile_pattern(pattern, where)
    if value == "skip":
        return Override(pattern, {"skip": True})
    if value.isdigit():
        return Override(pattern, check_settings({"bits": int(value)}, where))
    settings = {}
    for part in value.split(","):
        key, _, v = part.partition(":")
        if key not in SETTINGS or not v:
            raise bad_input(f"{where}: {part!r} is not key:value with key one of {', '.join(SETTINGS)}")
        settings[key] = yaml.safe_load(v)
    return Override(pattern, check_settings(settings, where))


def with_flags(recipe: Recipe, *, bits=None, block_size=None, dtype=None, double_quant=None, scale_dtype=None,
               scale_search=None, method=None, targets=None, ignore=None, overrides=(), scale_refit=None) -> Recipe:
    """Flags override the recipe: settings replace, targets replace, ignore and overrides are appended."""
    flags = {k: v for k, v in dict(bits=bits, block_size=block_size, dtype=dtype, double_quant=double_quant,
                                   scale_dtype=scale_dtype, scale_search=scale_search, method=method,
                                   scale_refit=scale_refit).items()
             if v is not None}
    flags = check_settings(flags, "flags")
    out = replace(recipe, **flags)
    if targets:
        out.targets = _patterns(list(targets), "--targets", "flags")
    if ignore:
        out.ignore = out.ignore + _patterns(list(ignore), "--ignore", "flags")
    out.overrides = out.overrides + [parse_override(o) for o in overrides]
    return out


def recipe_record(recipe: Recipe) -> dict:
    """The recipe as an output's manifest records it (`kbit encode` and the Python API's save alike)."""
    return {**recipe.settings(), "targets": recipe.targets, "ignore": recipe.ignore,
            "overrides": [{"pattern": o.pattern, **o.settings} for o in recipe.overrides], "source": recipe.source}


def is_default_target(name: str, shape: tuple[int, ...], is_float: bool) -> bool:
    """The default targets: 2-D floating-point `.weight` tensors that are not embeddings, norms or lm_head."""
    return is_float and len(shape) == 2 and name.endswith(".weight") and not NOT_LINEAR.search(name)
