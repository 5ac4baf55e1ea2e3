"""`kbit plan` as a function: measure every target tensor under every choice, solve the allocation for the
budget, and return the recipe that encodes it, with its exact size and predicted loss.

The targets are those of the base recipe (default: the linear layers' weights; a recipe that targets
embeddings or lm_head gets them planned too). The loss prediction assumes round-to-nearest with plain absmax
scales, what `kbit encode --recipe plan.yaml` does without --calib.
"""

from __future__ import annotations

import contextlib
import math
import time

from kbitcli.allocate.choices import DEFAULT_CHOICES, Budget, parse_budget, parse_choices
from kbitcli.allocate.sensitivity import KINDS, SELF, collect_importance, tensor_losses
from kbitcli.allocate.solve import limits, solve
from kbitcli.allocate.write import encoded_bytes, parse_back, recipe_dict, recipe_text
from kbitcli.encode import DEFAULT_SHARD, check_calibration, plan_source
from kbitcli.errors import KbitError, bad_input
from kbitcli.formats.source import open_source
from kbitcli.parallel import default_workers, ordered_map, single_threaded_torch
from kbitcli.progress import NullProgress
from kbitcli.recipes import Recipe

MAX_SIZE_ROUNDS = 8  # a size budget: re-solve while the file overhead (headers, shared tables) is learnt


def measure(src, targets, grid, importance: dict | None, progress) -> tuple[list, list]:
    """costs[t][c] (exact bits on disk) and losses[t][c] (predicted) of every target under every choice."""
    progress.start("sensitivity", sum(t.in_bytes() for t in targets), len(targets))

    def one(t):
        specs = [c.spec(t.shape) for c in grid]
        imp = None if importance is None else importance[t.name]
        return [c.cost_bits(t.shape) for c in grid], tensor_losses(src.get(t.name), specs, imp)

    costs, losses = [], []
    workers = default_workers()
    with single_threaded_torch() if workers > 1 else contextlib.nullcontext():
        for t, (c, loss) in ordered_map(one, targets, workers):
            costs.append(c)
            losses.append(loss)
            progress.advance(t.name, t.in_bytes())
    progress.stop()
    return costs, losses


def measure_model(src_path: str, grid, recipe: Recipe, calib, kind: str, max_shard_size=DEFAULT_SHARD,
                  progress=None) -> dict:
    """The targets of `recipe` and each one's exact cost and predicted loss under every choice of `grid`."""
    progress = progress or NullProgress()
    if isinstance(grid, str):
        grid = parse_choices(grid)
    src = open_source(src_path)
    targets = plan_source(src, recipe, max_shard_size if src.is_folder else None).quantized
    if not targets:
        raise bad_input(f"{src_path}: the recipe targets no tensor, so there is nothing to plan; "
                        "run `kbit inspect SRC` to list the names")
    importance, calib_record = None, None
    if calib is not None:
        if calib.path == SELF:  # no file to check; the model must be able to run and write
            if not src.is_folder or src.config is None:
                raise bad_input(f"{src_path}: --calib self samples text from the model, which needs the model "
                                "folder (config.json, tokenizer); point SRC at it, or plan data-free")
        else:
            check_calibration(src, calib)
        importance, calib_record = collect_importance(src_path, [t.name for t in targets], calib,
                                                      kind if kind != "weight" else "activation", progress)
        if kind == "weight":
            importance = None
    costs, losses = measure(src, targets, grid, importance, progress)
    return {"targets": targets, "costs": costs, "losses": losses, "calibration": calib_record}


def _limits_error(budget: Budget, lo: float, hi: float, unit: str) -> KbitError:
    fmt = (lambda v: f"{v:.4f}") if unit == "bits" else (lambda v: f"{int(v):,} bytes")
    return bad_input(f"--budget {budget.text}: outside what the choices allow; give a budget from {fmt(lo)} "
                     f"(every tensor at its cheapest choice) to {fmt(hi)} (every tensor at its richest)"
                     + (" bits per quantized parameter" if unit == "bits" else ""))


def plan(src_path: str, budget: str | Budget, *, choices: str = DEFAULT_CHOICES, recipe: Recipe | None = None,
         calib=None, sensitivity: str | None = None, max_shard_size: str | int | None = DEFAULT_SHARD,
         progress=None, command: str | None = None, measured: dict | None = None) -> dict:
    """The plan for src_path under `budget` ('3.5' bits per quantized parameter, or '60MB' of output).
    Returns a dict with the recipe YAML text ('recipe_yaml'), the per-tensor allocation ('tensors'), the
    predicted bits, bytes and loss; nothing is written. calib: a calibration.data.Calibration (data-aware).
    measured: what measure_model returned for the same choices, recipe and sensitivity (several budgets, one
    measurement)."""
    t0 = time.time()
    progress = progress or NullProgress()
    budget = parse_budget(budget) if not isinstance(budget, Budget) else budget
    grid = parse_choices(choices)
    recipe = recipe or Recipe()
    kind = sensitivity or ("fisher" if calib is not None else "weight")
    if kind not in KINDS:
        raise bad_input(f"--sensitivity {kind!r}: must be one of {', '.join(KINDS)}")
    if kind != "weight" and calib is None:
        raise bad_input(f"--sensitivity {kind} runs the model on text: add --calib FILE, or use --sensitivity weight")
    src = open_source(src_path)
    m = measured or measure_model(src_path, grid, recipe, calib, kind, max_shard_size, progress)
    targets, costs, losses, calib_record = m["targets"], m["costs"], m["losses"], m["calibration"]
    qparams = sum(t.numel for t in targets)
    lo, hi = limits(costs)

    def assignment_for(pick):
        return {t.name: grid[c].settings() for t, c in zip(targets, pick)}

    def encoded(pick):
        text_recipe = parse_back(recipe_text(recipe_dict(recipe, assignment_for(pick)), []))
        return encoded_bytes(src, text_recipe, max_shard_size)

    if budget.kind == "bits":
        if not lo / qparams <= budget.value <= hi / qparams:
            raise _limits_error(budget, lo / qparams, hi / qparams, "bits")
        pick = solve(costs, losses, math.floor(budget.value * qparams))
        nbytes, eplan = encoded(pick)
    else:
        # the file's overhead beyond the planned tensors' own bytes (dense tensors, headers, shared tables)
        # barely depends on the choices: learn it from the cheapest plan, then re-solve while it overshoots
        cheap = [min((c for c in range(len(grid)) if r[c] is not None), key=lambda c: r[c]) for r in costs]
        rich = [max((c for c in range(len(grid)) if r[c] is not None), key=lambda c: r[c]) for r in costs]
        lo_bytes, _ = encoded(cheap)
        hi_bytes, _ = encoded(rich)
        if not lo_bytes <= budget.value <= hi_bytes:
            raise _limits_error(budget, lo_bytes, hi_bytes, "bytes")
        overhead = lo_bytes - lo // 8
        for _ in range(MAX_SIZE_ROUNDS):
            pick = solve(costs, losses, (budget.value - overhead) * 8)
            nbytes, eplan = encoded(pick)
            if nbytes <= budget.value:
                break
            overhead += nbytes - budget.value
        else:
            pick, (nbytes, eplan) = cheap, encoded(cheap)
    assignment = assignment_for(pick)
    chosen = {t.name: grid[c] for t, c in zip(targets, pick)}
    # the recipe must give every tensor exactly the spec its cost and loss were measured with
    for t in eplan.quantized:
        want = chosen[t.name].spec(t.shape)
        if (t.spec.bits, t.spec.block_size, t.spec.dtype, t.spec.double_quant) != \
                (want.bits, want.block_size, want.dtype, want.double_quant):
            raise KbitError(f"internal: the plan's recipe gives {t.name} {t.spec}, not {want}", 1)
    summary = eplan.summary()
    total_loss = sum(losses[i][c] for i, c in enumerate(pick))
    rows = []
    for i, (t, c) in enumerate(zip(targets, pick)):
        ch = grid[c]
        rows.append({"name": t.name, "shape": list(t.shape), "params": t.numel, "choice": ch.label(), **ch.settings(),
                     "bits_per_param": round(costs[i][c] / t.numel, 4), "bytes": costs[i][c] // 8,
                     "predicted_loss": losses[i][c], "share": losses[i][c] / total_loss if total_loss > 0 else 0.0})
    qbits = sum(costs[i][c] for i, c in enumerate(pick))
    header = [f"kbit plan: per-tensor bits for {src_path}, budget {budget.describe()}",
              f"predicted: {qbits / qparams:.4f} bits per quantized parameter, {nbytes:,} bytes of weight files "
              f"as `kbit encode` writes them, predicted loss {total_loss:.6g} ({kind} sensitivity"
              + (f", {calib_record['tokens']:,} tokens of {calib_record['file']}" if calib_record else ", data-free") + ")",
              f"choices: {choices}",
              f"made by: {command or 'kbitcli.api.plan'}",
              f"use: kbit encode {src_path} OUT --recipe THIS_FILE"]
    text = recipe_text(recipe_dict(recipe, assignment), header)
    return {"source": src_path, "budget": {"kind": budget.kind, "value": budget.value, "text": budget.text},
            "sensitivity": kind, "calibration": calib_record, "choices": choices, "choices_count": len(grid),
            "limits": {"bits_per_param": [round(lo / qparams, 4), round(hi / qparams, 4)]},
            "predicted": {"bits_per_param_quantized": qbits / qparams, "bytes_out": nbytes, "loss": total_loss,
                          "bits_per_param_model": summary["bits_per_param_model"]},
            "quantized_params": qparams, "tensors": rows, "recipe_yaml": text, "seconds": round(time.time() - t0, 3)}
