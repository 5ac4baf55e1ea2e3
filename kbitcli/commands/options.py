"""The encode options (`--recipe`, `-k`, `-b`, `-t`, ...) for commands that quantize on the fly (bench ...).

Declared once so every command spells them as `kbit encode` does; `recipe_from_options` turns them into a
Recipe exactly as `kbit encode` would (recipe file first, flags on top).
"""

from __future__ import annotations

import typer

from kbitcli.recipes import Recipe, load_recipe, with_flags

RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/).")
BitsOpt = typer.Option(None, "--bits", "-k", help="k: bits per weight, 2..8.")
BlockSizeOpt = typer.Option(None, "--block-size", "-b", help="Power of two 16..4096, 'row' or 'tensor'.")
DataTypeOpt = typer.Option(None, "--dtype", "-t", help="int | fp | nf | quantile | dynamic.")
DoubleQuantOpt = typer.Option(None, "--double-quant/--no-double-quant", help="8-bit scales (bnb style).")
ScaleDtypeOpt = typer.Option(None, "--scale-dtype", help="fp16 | bf16 | fp32 scales.")
ScaleSearchOpt = typer.Option(None, "--scale-search", help="Candidate scales per block (1 = plain absmax; default 1, or 8 importance-weighted with --calib).")
MethodOpt = typer.Option(None, "--method", "-m", help="rtn (round to nearest; with --calib: importance-weighted scales) | gptq (needs --calib). Default: rtn.")
CalibOpt = typer.Option(None, "--calib", help="Calibration text (plain or JSONL 'text') the model runs on, block by block.")
CalibTokensOpt = typer.Option(None, "--calib-tokens", help="Calibration tokens to use (default 16384).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the calibration sample.")
DampOpt = typer.Option(None, "--damp", help="GPTQ dampening, a fraction of mean(diag H) (default 0.01).")
ActOrderOpt = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: quantize columns by descending activation energy (default: on).")
TargetsOpt = typer.Option(None, "--targets", help="Pattern of tensors to quantize (repeatable); replaces the recipe's.")
IgnoreOpt = typer.Option(None, "--ignore", help="Pattern of tensors to keep dense (repeatable).")
OverrideOpt = typer.Option(None, "--override", "-o", help="PATTERN=BITS | PATTERN=skip | PATTERN=key:value,... (repeatable, in order).")


def recipe_from_options(recipe=None, bits=None, block_size=None, dtype=None, double_quant=None, scale_dtype=None,
                        targets=None, ignore=None, override=None, scale_search=None, method=None) -> Recipe | None:
    """The Recipe these options describe, or None when none was given (so a command can tell 'use defaults'
    from 'the user asked for this', e.g. to refuse options for an already k-bit MODEL)."""
    given = [recipe, bits, block_size, dtype, double_quant, scale_dtype, targets, ignore, override, scale_search, method]
    if all(v is None or v == [] for v in given):
        return None
    return with_flags(load_recipe(recipe), bits=bits, block_size=block_size, dtype=dtype, double_quant=double_quant,
                      scale_dtype=scale_dtype, scale_search=scale_search, method=method, targets=targets,
                      ignore=ignore, overrides=override or ())


def calibration_from_options(calib=None, calib_tokens=None, seed=0, damp=None, act_order=None):
    """The Calibration --calib & co. describe, or None without --calib (then the other options are refused)."""
    from kbitcli.calibration.data import DEFAULT_TOKENS, Calibration
    from kbitcli.errors import bad_input

    if calib is None:
        extra = [n for n, v in (("--calib-tokens", calib_tokens), ("--damp", damp), ("--act-order", act_order))
                 if v is not None]
        if extra:
            raise bad_input(f"{extra[0]} goes with --calib FILE (calibration text)")
        return None
    c = Calibration(calib, DEFAULT_TOKENS if calib_tokens is None else calib_tokens, seed,
                    0.01 if damp is None else damp, True if act_order is None else act_order)
    c.check()
    return c
