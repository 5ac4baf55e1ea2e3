"""bench scaling: the paper's bit-level scaling study for the user's own models.

A study (YAML, see recipes/study-tiny.yaml) names models, one text and a grid of k x block size x data type.
For each (model, cell) it records the total model bits (every stored bit: quantized tensors at k plus their
scales and own codebooks, shared codebook tables, every other tensor at its stored width) and a metric:
nll (nats/token) for causal LMs, 1 - mean cosine similarity of the pooled embeddings for encoders.

Cells are evaluated by *simulated quantization*: one dense fp32 copy of the model gets each cell's
quantized-then-dequantized weights (exactly the values the k-bit layers decode) and runs its normal forward,
which is numerically the k-bit forward up to float rounding and far cheaper than an encode + load per cell.

Every finished cell is appended to DIR/cells.jsonl at once, so an interrupted study resumes with --resume.
At the end: results.csv / results.json, report.md, plots/*.png and the Pareto frontier (the verdict).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import time


from kbitcli.bench import evaluate as ev
from kbitcli.bench.error import (encoded_weights, grid_recipes, is_quantized_checkpoint, open_weights, parse_grid,
                                 simulated_quantization)
from kbitcli.bench.frontier import describe_cell, verdict
from kbitcli.bench.report import write_results
from kbitcli.errors import KbitError, bad_input
from kbitcli.io.atomic import AtomicOutput
from kbitcli.plan import make_plan
from kbitcli.recipes import Recipe, from_dict, load_recipe, read_yaml

STUDY_KEYS = {"name", "text", "models", "grid", "recipe", "context", "stride", "split_on", "max_tokens", "max_lines",
              "calib", "calib_tokens"}
MODEL_KEYS = {"path", "name"}
CELLS = "cells.jsonl"
CELL_KEY = ("model", "bits", "block_size", "dtype", "double_quant", "scale_search", "method", "scale_refit")


def resolve_path(value, base: str, where: str) -> str:
    """'pkg:MODULE/sub/path' is inside an installed package; anything else is relative to the study file."""
    if not isinstance(value, str) or not value:
        raise bad_input(f"{where}: expected a path, got {value!r}")
    if value.startswith("pkg:"):
        module, _, sub = value[4:].partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise bad_input(f"{where}: package {module!r} is not installed (pip install it, or give a folder path)")
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
    else:
        path = os.path.join(base, os.path.expanduser(value))
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise bad_input(f"{where}: {value!r} -> {path} does not exist")
    return path


def load_study(path: str) -> dict:
    """Read and validate a study file; every error is one line naming the file and the key."""
    data = read_yaml(path, "study file", "recipes/study-tiny.yaml")
    if not isinstance(data, dict):
        raise bad_input(f"{path}: a study is a YAML mapping with keys {', '.join(sorted(STUDY_KEYS))}")
    unknown = set(data) - STUDY_KEYS
    if unknown:
        raise bad_input(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; valid keys: {', '.join(sorted(STUDY_KEYS))}")
    base = os.path.dirname(os.path.abspath(path))
    for key in ("text", "models", "grid"):
        if key not in data:
            raise bad_input(f"{path}: missing key {key!r} (see recipes/study-tiny.yaml)")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise bad_input(f"{path}: models must be a non-empty list of folders (or {{path: ..., name: ...}})")
    resolved = []
    for i, m in enumerate(models):
        where = f"{path}: models[{i}]"
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict) or "path" not in m or set(m) - MODEL_KEYS:
            raise bad_input(f"{where}: expected a folder path or {{path: ..., name: ...}}")
        p = resolve_path(m["path"], base, where)
        if not os.path.isdir(p):
            raise bad_input(f"{where}: {p} is not a model folder")
        if is_quantized_checkpoint(p):
            raise bad_input(f"{where}: {p} is already quantized; a study starts from dense models")
        ev.model_kind(p)  # config.json must be there
        resolved.append({"path": p, "name": str(m.get("name") or os.path.basename(p.rstrip("/")))})
    names = [m["name"] for m in resolved]
    if len(set(names)) != len(names):
        raise bad_input(f"{path}: two models are named alike ({names}); give each a distinct name:")
    grid = data["grid"]
    if not isinstance(grid, dict) or not grid:
        raise bad_input(f"{path}: grid must map bits / block_size / dtype to lists, e.g. {{bits: 2..8, block_size: [64], dtype: [nf]}}")
    tokens = []
    for k, v in grid.items():
        values = v if isinstance(v, list) else [v]
        tokens.append(f"{k}={','.join(str(x).lower() if isinstance(x, bool) else str(x) for x in values)}")
    try:
        parsed = parse_grid(tokens)
    except KbitError as e:
        raise bad_input(f"{path}: grid: {str(e).removeprefix('--grid ')}") from None
    recipe = data.get("recipe")
    if isinstance(recipe, str):
        base_recipe = load_recipe(os.path.join(base, recipe))
    else:
        base_recipe = from_dict(recipe or {}, f"{path}: recipe")
    recipes = grid_recipes(base_recipe, parsed)
    opts = {}
    for key, default in (("context", None), ("stride", None), ("max_tokens", None), ("max_lines", 256)):
        v = data.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad_input(f"{path}: {key} must be a positive whole number, got {v!r}")
        opts[key] = v
    split = data.get("split_on", "auto")
    if split is not None and not isinstance(split, str):
        raise bad_input(f"{path}: split_on must be 'auto', 'none' or a separator string")
    text = resolve_path(data["text"], base, f"{path}: text")
    calib = None
    if data.get("calib") is not None:
        from kbitcli.calibration.data import DEFAULT_TOKENS, Calibration

        calib = Calibration(resolve_path(data["calib"], base, f"{path}: calib"), data.get("calib_tokens", DEFAULT_TOKENS))
        calib.check()
        if os.path.samefile(calib.path, text):
            raise bad_input(f"{path}: calib and text are the same file; score on text the calibration never saw")
    if any(r.method == "gptq" for r in recipes) and calib is None:
        raise bad_input(f"{path}: the grid has method gptq, which needs calibration text: add `calib: FILE`")
    return {"calib": calib, "name": str(data.get("name") or os.path.splitext(os.path.basename(path))[0]), "file": path,
            "text": text, "models": resolved, "recipes": recipes, "base_recipe": base_recipe,
            "split_on": split or "none", **opts}


def fingerprint(study: dict) -> str:
    """What makes a finished cell reusable: the text and the evaluation options (not the grid or the models)."""
    with open(study["text"], "rb") as fh:
        text_sha = hashlib.sha256(fh.read()).hexdigest()
    r = study["base_recipe"]
    key = {"text": text_sha, "recipe": [r.targets, r.ignore, [(o.pattern, o.settings) for o in r.overrides], r.scale_dtype],
           "version": 3, "calib": _calib_key(study.get("calib")),
           **{k: study[k] for k in ("context", "stride", "split_on", "max_tokens", "max_lines")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _calib_key(calib) -> list | None:
    if calib is None:
        return None
    with open(calib.path, "rb") as fh:
        return [hashlib.sha256(fh.read()).hexdigest(), calib.tokens, calib.seed]


def cell_key(cell: dict) -> tuple:
    return tuple(cell.get(k) for k in CELL_KEY)


def open_cells(out: str, fp: str, resume: bool, force: bool) -> dict:
    """Finished cells from DIR/cells.jsonl (with --resume), after checking they belong to this study."""
    path = os.path.join(out, CELLS)
    if os.path.exists(out) and not os.path.isdir(out):
        raise bad_input(f"--out {out} is a file; give a folder")
    if os.path.exists(path) and not (resume or force):
        raise bad_input(f"{out} already holds a study ({CELLS}); pass --resume to continue it or --force to start over")
    if os.path.isdir(out) and not os.path.exists(path) and os.listdir(out) and not force:
        raise bad_input(f"{out} exists and is not a study folder; pass --force to write into it, or choose another --out")
    done = {}
    if resume and os.path.exists(path):
        with open(path) as fh:
            lines = fh.read().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("study") != fp:
            raise bad_input(f"{path} was made with another text or other evaluation options; "
                            "use another --out, or --force to start over")
        for line in lines[1:]:
            try:
                cell = json.loads(line)
            except ValueError:  # a line cut short by a crash: that cell runs again
                continue
            # cells written before the scale_refit axis have no such field: they were refit-free
            cell.setdefault("scale_refit", None if cell.get("dtype") == "dense" else False)
            done[cell_key(cell)] = cell
    os.makedirs(out, exist_ok=True)
    # (re)start the file with the header and the good cells only, so nothing is appended to a broken line
    with AtomicOutput(path, folder=False, force=True) as o:
        with open(o.tmp, "w") as fh:
            fh.write(json.dumps({"study": fp}) + "\n")
            fh.writelines(json.dumps(c) + "\n" for c in done.values())
    return done


def append_cell(out: str, cell: dict) -> None:
    with open(os.path.join(out, CELLS), "a") as fh:
        fh.write(json.dumps(cell) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class ModelEvaluator:
    """One model of the study: its dense reference (computed once) and a copy that takes each cell's weights."""

    def __init__(self, model: dict, study: dict, text: str):
        from kbitcli.models.load import load_model

        self.calib = study.get("calib")
        self.name, self.path = model["name"], model["path"]
        self.kind = ev.model_kind(self.path)
        self.reader = open_weights(self.path)
        dense, tok = load_model(self.path, dtype="fp32")
        if tok is None:
            raise bad_input(f"{self.path}: no tokenizer files to read the study text with")
        self.context, self.stride = ev.check_context(study["context"], study["stride"], ev.max_positions(self.path))
        self.tokenizer = ev.describe_tokenizer(tok, self.path)
        if self.kind == "causal":
            windows, self.tokenization = ev.causal_windows(tok, text, self.context, self.stride, study["split_on"],
                                                           study["max_tokens"])
            self.ref = ev.CausalReference(dense, windows)
            self.tokens = self.ref.tokens
        else:
            self.lines, self.tok = ev.encoder_lines(text, study["max_lines"]), tok
            self.ref_emb, self.tokens = ev.embed(dense, tok, self.lines, self.context)
            self.tokenization = {"mode": "lines", "lines": len(self.lines), "pooling": "mean"}
        self.quant = copy.deepcopy(dense)  # the dense reference stays untouched while cells run
        self.dense_bits = sum(self._dense_bits(n, dt, shape) for n, dt, shape in self.reader.names_infos)

    @staticmethod
    def _dense_bits(name, dtype, shape) -> int:
        import math

        return math.prod(shape) * dtype.itemsize * 8

    def metric(self, model) -> dict:
        # causal LMs are judged by KL to the dense model: on a few thousand tokens nll differences between
        # good cells are within noise (a k = 8 cell can score below dense), KL is not (issue 8)
        if self.kind == "causal":
            r = self.ref.compare(model)
            return {"metric_name": "kl", "metric": r["kl_divergence"], **r}
        emb, _ = ev.embed(model, self.tok, self.lines, self.context)
        c = ev.cosine_stats(self.ref_emb, emb)
        return {"metric_name": "1-cosine", "metric": 1 - c["cosine_mean"], **c}

    def baseline(self) -> dict:
        base = {"model": self.name, "path": self.path, "kind": self.kind, "bits": None, "block_size": None, "dtype": "dense",
                "double_quant": None, "scale_search": None, "method": None, "scale_refit": None, "total_bits": self.dense_bits, "params": self.params(),
                "bits_per_param_model": self.dense_bits / self.params(), "bits_per_param": None}
        if self.kind == "causal":
            b = self.ref.baseline()
            return {**base, "metric_name": "kl", "metric": 0.0, **b, "kl_divergence": 0.0, "top1_agreement": 1.0}
        return {**base, "metric_name": "1-cosine", "metric": 0.0, "cosine_mean": 1.0, "cosine_min": 1.0}

    def params(self) -> int:
        import math

        return sum(math.prod(s) for _, _, s in self.reader.names_infos)

    def plan_cell(self, budget: float, base_recipe: Recipe) -> dict:
        """A `kbit plan` mix for `budget` bits per quantized parameter (Fisher-weighted with the study's calib,
        data-free without), evaluated like any cell and marked dtype 'plan', k = the budget."""
        from kbitcli.allocate.planner import plan
        from kbitcli.allocate.write import parse_back

        p = plan(self.path, str(budget), recipe=base_recipe, calib=self.calib)
        recipe = parse_back(p["recipe_yaml"], f"plan {budget}")
        cell = self.cell(recipe)
        cell.update(bits=budget, block_size="mixed", dtype="plan", double_quant=True, method="rtn",
                    plan_sensitivity=p["sensitivity"])
        return cell

    def cell(self, recipe: Recipe) -> dict:
        t0 = time.time()
        calibrated = recipe.method == "gptq"  # rtn cells stay data-free: the paper's round-to-nearest
        plan = make_plan(self.reader.names_infos, recipe, calibrated=calibrated)
        s = plan.summary()
        if calibrated:  # GPTQ cells are real encodes (calibration cannot be simulated), decoded into the copy
            with encoded_weights(self.quant, self.path, recipe, self.calib):
                m = self.metric(self.quant)
        else:
            with simulated_quantization(self.quant, self.reader, plan):
                m = self.metric(self.quant)
        return {"model": self.name, "path": self.path, "kind": self.kind, "bits": recipe.bits,
                "block_size": recipe.block_size, "dtype": recipe.dtype, "double_quant": recipe.double_quant,
                "scale_search": recipe.scale_search, "method": recipe.method, "scale_refit": bool(recipe.scale_refit),
                "total_bits": s["bytes_out"] * 8, "params": s["params"], "bits_per_param_model": s["bytes_out"] * 8 / s["params"],
                "bits_per_param": s["bits_per_param_quantized"], **m, "seconds": round(time.time() - t0, 3)}


def parse_plans(text: str | None) -> list[float]:
    """--plans '3,3.5,4' -> budgets in bits per quantized parameter."""
    if not text:
        return []
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise bad_input(f"--plans {text!r}: expected budgets in bits per quantized parameter, e.g. 3,3.5,4") from None
    if not out or any(not 1 < b <= 32 for b in out):
        raise bad_input(f"--plans {text!r}: expected budgets in bits per quantized parameter, e.g. 3,3.5,4")
    return out


def run_study(study_path: str, out: str, *, resume: bool = False, force: bool = False, progress=None,
              plans: list[float] | None = None) -> dict:
    """plans: budgets (bits per quantized parameter) whose `kbit plan` mixes join the cells (dtype 'plan')."""

    t0 = time.time()
    study = load_study(study_path)
    text = ev.read_text(study["text"])
    fp = fingerprint(study)
    done = open_cells(out, fp, resume, force)
    plans = plans or []
    todo_total = len(study["models"]) * (len(study["recipes"]) + 1 + len(plans))
    cells, evaluated, meta = [], 0, {}
    if progress is not None:
        progress.start("scaling", 0, todo_total)
    try:
        for model in study["models"]:
            keys = [(model["name"], None, None, "dense", None, None, None, None)] + [
                (model["name"], r.bits, r.block_size, r.dtype, r.double_quant, r.scale_search, r.method,
                 bool(r.scale_refit)) for r in study["recipes"]] + [
                (model["name"], b, "mixed", "plan", True, None, "rtn", bool(study["base_recipe"].scale_refit))
                for b in plans]  # a plan keeps the base recipe's settings (allocate/write.py), its refit included
            if all(k in done for k in keys):
                cells += [done[k] for k in keys]
                if progress is not None:
                    for k in keys:
                        progress.advance(f"{model['name']} (reused)", 0)
                continue
            evaluator = ModelEvaluator(model, study, text)
            meta[model["name"]] = {"kind": evaluator.kind, "context": evaluator.context, "tokens": evaluator.tokens,
                                   "tokenizer": evaluator.tokenizer, "tokenization": evaluator.tokenization}
            for key, recipe in zip(keys, [None] + study["recipes"] + plans):
                if key in done:
                    cell = done[key]
                else:
                    cell = evaluator.baseline() if recipe is None else evaluator.plan_cell(recipe, study["base_recipe"]) \
                        if isinstance(recipe, float) else evaluator.cell(recipe)
                    cell.update(meta[model["name"]])
                    append_cell(out, cell)
                    evaluated += 1
                cells.append(cell)
                if progress is not None:
                    progress.advance(f"{model['name']} {describe_cell(cell, True)}", 0)
    except KeyboardInterrupt:
        raise KbitError(f"interrupted after {evaluated} new cell(s); finished cells are kept in "
                        f"{os.path.join(out, CELLS)}: rerun with --resume to continue", exit_code=1) from None
    finally:
        if progress is not None:
            progress.stop()
    result = {"study": study["name"], "file": study_path, "text": study["text"], "out": out,
              "evaluation": "simulated quantization (dense fp32 model with dequantized weights; gptq cells: "
                            "real calibrated encodes, decoded into it)",
              "cells": len(cells), "evaluated": evaluated, "reused": len(cells) - evaluated,
              "models": [{"name": m["name"], "path": m["path"]} for m in study["models"]],
              "verdict": verdict(cells)}
    result["files"] = write_results(out, study, cells, result)
    result["seconds"] = round(time.time() - t0, 3)
    return result
