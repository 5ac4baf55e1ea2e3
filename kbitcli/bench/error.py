"""bench error: data-free quantization error of a checkpoint for one recipe or a grid of k x block x data type.

Every targeted tensor is quantized and dequantized in memory with `core.blockwise`, using the same plan as
`kbit encode` (same targets, ignores, overrides, same block resolution), so the numbers are those of the
checkpoint `encode` would write. Per tensor and per configuration: SQNR (dB), MSE and stored bits per
parameter; the whole-model SQNR is 10 log10(sum w^2 / sum err^2) over all quantized tensors.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from kbitcli.core.blockwise import dequantize, quantize
from kbitcli.errors import KbitError, bad_input
from kbitcli.plan import Plan, auto_refit, auto_search, make_plan, refit_refused
from kbitcli.recipes import Recipe, with_flags

GRID_KEYS = {"bits": "bits", "k": "bits", "block": "block_size", "block_size": "block_size", "dtype": "dtype",
             "type": "dtype", "data_type": "dtype", "double_quant": "double_quant", "dq": "double_quant",
             "scale_search": "scale_search", "search": "scale_search", "method": "method",
             "scale_refit": "scale_refit", "refit": "scale_refit"}
BOOL_KEYS = ("double_quant", "scale_refit")
GRID_EXAMPLE = "bits=2..8 block=32,64,128 dtype=nf,fp,int"


def parse_grid(specs) -> dict[str, list]:
    """'bits=2..8 block=32,64,128 dtype=nf,fp' (one string or several) -> {bits: [...], block_size: [...], ...}."""
    if isinstance(specs, str):
        specs = [specs]
    grid: dict[str, list] = {}
    for token in (t for s in specs for t in str(s).split()):
        key, sep, values = token.partition("=")
        where = f"--grid {token!r}"
        if not sep or not key or not values:
            raise bad_input(f"{where}: expected KEY=VALUES, e.g. {GRID_EXAMPLE}")
        if key not in GRID_KEYS:
            raise bad_input(f"{where}: unknown key {key!r}; use bits, block, dtype, double_quant, scale_search, "
                            f"scale_refit or method ({GRID_EXAMPLE})")
        name = GRID_KEYS[key]
        if name in grid:
            raise bad_input(f"{where}: {key} given twice; list all its values once, comma-separated")
        grid[name] = _values(name, values, where)
    return grid


def _values(name: str, text: str, where: str) -> list:
    out = []
    for part in text.split(","):
        if not part:
            raise bad_input(f"{where}: empty value in {text!r}; separate values with single commas")
        if ".." in part:
            lo, _, hi = part.partition("..")
            if name != "bits" or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi):
                raise bad_input(f"{where}: range {part!r} must be LOW..HIGH of bits, e.g. bits=2..8")
            out += list(range(int(lo), int(hi) + 1))
        elif name in ("bits", "scale_search"):
            if not part.isdigit():
                raise bad_input(f"{where}: {name} {part!r} is not a whole number; e.g. bits=2..8 or bits=3,4,8")
            out.append(int(part))
        elif name == "block_size":
            out.append(int(part) if part.isdigit() else part)
        elif name in BOOL_KEYS:
            if part.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise bad_input(f"{where}: {name} takes true/false, got {part!r}")
            out.append(part.lower() in ("true", "1", "yes"))
        else:
            out.append(part)
    return list(dict.fromkeys(out))


def grid_recipes(base: Recipe, grid: dict[str, list] | None) -> list[Recipe]:
    """One recipe per grid cell (the base recipe's settings where the grid says nothing); each is validated."""
    grid = grid or {}
    cells = [{}]
    for key in ("method", "dtype", "double_quant", "scale_search", "scale_refit", "block_size", "bits"):
        if key in grid:
            cells = [{**c, key: v} for c in cells for v in grid[key]]
    recipes = []
    for c in cells:
        try:
            r = with_flags(base, **c)
        except KbitError as e:
            raise bad_input(f"--grid: {str(e).removeprefix('flags: ')}") from None
        if refit_refused(r.settings(), calibrated=False):  # rtn cells are data-free; gptq cells calibrated
            # said before any work: plan.auto_refit would refuse the cell only when it is reached
            raise bad_input(f"--grid: scale_refit applies to data-free round-to-nearest, not method {r.method}; "
                            "give the refit cells method rtn (or drop scale_refit)")
        recipes.append(r)
    return recipes


def config_label(recipe: Recipe) -> dict:
    return {"bits": recipe.bits, "block_size": recipe.block_size, "dtype": recipe.dtype,
            "double_quant": recipe.double_quant, "scale_dtype": recipe.scale_dtype,
            "scale_search": auto_search(recipe.settings(), calibrated=False),  # as the plan resolves them
            "scale_refit": auto_refit(recipe.settings(), False, "config")}


@dataclass
class WeightsReader:
    """Dense tensors of a checkpoint: read from a dense one, or decoded from a k-bit/foreign one."""

    path: str
    names_infos: list
    get: callable
    decoded: bool  # True: the weights are the decoded values of an already quantized checkpoint


def open_weights(path: str) -> WeightsReader:
    from kbitcli.encode import refuse_quantized
    from kbitcli.formats.source import open_source

    if is_quantized_checkpoint(path):
        from kbitcli.formats.registry import open_reader

        ck = open_reader(path)
        infos = [(n, ck.orig_dtype(n), ck.shape(n)) for n in ck.names]
        return WeightsReader(path, infos, lambda n: ck.tensor(n, torch.float32), True)
    src = open_source(path)
    refuse_quantized(src)
    return WeightsReader(path, [(n, *src.info(n)) for n in src.names], src.get, False)


def is_quantized_checkpoint(path: str) -> bool:
    """A kbit checkpoint, or a bnb / compressed-tensors / GGUF one (formats/registry.detect)."""
    from kbitcli.formats.registry import detect

    try:
        return detect(path) != "dense"
    except KbitError:  # a layout kbit does not read: open_weights / refuse_quantized say why
        return False


def quantization_error(reader: WeightsReader, recipes: list[Recipe], progress=None) -> list[dict]:
    """Per recipe: per-tensor and whole-model SQNR / MSE / bits per parameter."""
    plans: list[Plan] = [make_plan(reader.names_infos, r) for r in recipes]  # every recipe error before any work
    by_name = [{t.name: t for t in p.tensors} for p in plans]
    names = [t.name for t in plans[0].tensors]
    quantized = [n for n in names if any(b[n].quantized for b in by_name)]
    rows = [{n: None for n in names} for _ in plans]
    total = sum(sum(1 for t in p.quantized) for p in plans)
    if progress is not None:
        progress.start("bench error", 0, total)
    for name in quantized:
        w = reader.get(name).float()
        for i, b in enumerate(by_name):
            t = b[name]
            if not t.quantized:
                continue
            deq = dequantize(quantize(w, t.spec, name), torch.float32)
            signal = w.double().pow(2).sum().item()
            noise = (w.double() - deq.double()).pow(2).sum().item()
            rows[i][name] = {"name": name, "shape": list(t.shape), "params": t.numel, "signal": signal, "noise": noise,
                             "sqnr_db": _db(signal, noise), "mse": noise / t.numel,
                             "bits_per_param": t.out_bytes() * 8 / t.numel}
            if progress is not None:
                progress.advance(name, 0)
    if progress is not None:
        progress.stop()
    out = []
    for plan, recipe, row in zip(plans, recipes, rows):
        tensors = [r for r in row.values() if r is not None]
        signal, noise = sum(r["signal"] for r in tensors), sum(r["noise"] for r in tensors)
        qparams = sum(r["params"] for r in tensors)
        s = plan.summary()
        out.append({**config_label(recipe), "sqnr_db": _db(signal, noise), "mse": noise / qparams if qparams else None,
                    "bits_per_param": s["bits_per_param_quantized"], "bits_per_param_model": s["bits_per_param_model"],
                    "params": s["params"], "quantized_params": qparams, "quantized_tensors": len(tensors),
                    "tensors": [{k: v for k, v in r.items() if k not in ("signal", "noise")} for r in tensors]})
    return out


def _db(signal: float, noise: float) -> float | None:
    """SQNR in dB; None (JSON null) when there is no error at all or no signal, where it has no finite value."""
    if noise == 0 or signal == 0:
        return None
    return 10 * math.log10(signal / noise)


def bench_error(src: str, recipe: Recipe | None = None, grid: dict | None = None, progress=None) -> dict:
    reader = open_weights(src)
    recipes = grid_recipes(recipe or Recipe(), grid)
    configs = quantization_error(reader, recipes, progress)
    if not configs[0]["quantized_tensors"]:
        raise bad_input(f"{src}: the recipe quantizes no tensor; name some with --targets")
    return {"source": src, "decoded_input": reader.decoded, "configs": configs,
            "note": "error of re-quantizing the decoded weights of an already quantized checkpoint" if reader.decoded else None}


@contextlib.contextmanager
def simulated_quantization(model, reader: WeightsReader, plan: Plan):
    """Inside the block, every planned tensor of `model` holds its quantized-then-dequantized value.

    "Simulated quantization": the dense forward then computes what the k-bit forward computes (same codes,
    same scales, same dequantized weights), up to float rounding of the matmul order. The original weights
    are put back on the way out, so one dense model serves every cell of a study.
    """
    from kbitcli.hf import name_mapper

    params = model.state_dict(keep_vars=True)
    to_model = name_mapper(set(params), getattr(model, "base_model_prefix", ""))
    saved = {}
    try:
        with torch.no_grad():
            for t in plan.quantized:
                target = to_model(t.name)
                if target is None:
                    raise bad_input(f"{reader.path}: tensor {t.name!r} matches no parameter of "
                                    f"{type(model).__name__}; is config.json the model's own?")
                p = params[target]
                deq = dequantize(quantize(reader.get(t.name).float(), t.spec, t.name), torch.float32)
                saved[target] = p.detach().clone()
                p.copy_(deq.view(p.shape).to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for target, original in saved.items():
                params[target].copy_(original)


@contextlib.contextmanager
def encoded_weights(model, path: str, recipe: Recipe, calib):
    """Inside the block, `model`'s quantized tensors hold the decoded values of a real (calibrated) encode."""
    import os
    import tempfile

    from kbitcli.encode import encode
    from kbitcli.formats.kbit_format import KbitCheckpoint
    from kbitcli.hf import name_mapper

    params = model.state_dict(keep_vars=True)
    to_model = name_mapper(set(params), getattr(model, "base_model_prefix", ""))
    saved = {}
    with tempfile.TemporaryDirectory(prefix="kbit-study-") as tmp:
        encode(path, os.path.join(tmp, "q"), recipe, calib=calib)
        ck = KbitCheckpoint(os.path.join(tmp, "q"))
        try:
            with torch.no_grad():
                for name in ck.names:
                    if ck.is_quantized(name):
                        p = params[to_model(name)]
                        saved[to_model(name)] = p.detach().clone()
                        p.copy_(ck.tensor(name, torch.float32).view(p.shape).to(p.dtype))
            yield model
        finally:
            with torch.no_grad():
                for target, original in saved.items():
                    params[target].copy_(original)
