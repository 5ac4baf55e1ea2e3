"""The encode options (`--recipe`, `-k`, `-b`, `-t`, ...) for commands that quantize on the fly (bench ...).

Declared once so every command spells them as `kbit encode` does; `recipe_from_options` turns them into a
Recipe exactly as `kbit encode` would (recipe file first, flags on top).

Two different things are called "dtype" in kbit, so no flag is: `--data-type/-t` is the codebook data type
(int | fp | nf | quantile | dynamic; the recipe key `dtype`) of encode and bench, `--torch-dtype` the torch
dtype (fp32 | fp16 | bf16) that decode, finetune and generate compute or write in. The old `--dtype` stays as a
hidden option (`RemovedDtypeOpt`) on every command that had it, and only says which of the two to use.
"""

from __future__ import annotations

from dataclasses import fields

import typer

from kbitcli.calibration.data import Calibration
from kbitcli.core.blockwise import SCALE_DTYPES
from kbitcli.core.codebooks import DTYPES, MAX_BITS, MIN_BITS
from kbitcli.plan import CALIBRATED_SEARCH, DATA_FREE_SEARCH
from kbitcli.recipes import MAX_BLOCK, MIN_BLOCK, Recipe, load_recipe, with_flags

# The defaults a command uses without --recipe, read from the code that applies them (Recipe(), plan.auto_search,
# Calibration()), so the help cannot drift from what runs.
DEFAULTS = Recipe()
_CALIB = {f.name: f.default for f in fields(Calibration)}
DEFAULT_TOKENS, DEFAULT_DAMP, DEFAULT_ACT_ORDER = _CALIB["tokens"], _CALIB["damp"], _CALIB["act_order"]


def _on(flag: bool) -> str:
    return "on" if flag else "off"


RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/); flags override its keys. "
                         "Without one the defaults below apply.")
BitsOpt = typer.Option(None, "--bits", "-k", help=f"k: bits per weight, {MIN_BITS}..{MAX_BITS} (default: {DEFAULTS.bits}).")
BlockSizeOpt = typer.Option(None, "--block-size", "-b", help=f"Values per scale: a power of two {MIN_BLOCK}..{MAX_BLOCK}, "
                            f"'row' or 'tensor' (default: {DEFAULTS.block_size}).")
DataTypeOpt = typer.Option(None, "--data-type", "-t",
                           help=f"Codebook data type: {' | '.join(DTYPES)} (recipe key `dtype`; default: {DEFAULTS.dtype}).")
DoubleQuantOpt = typer.Option(None, "--double-quant/--no-double-quant",
                              help=f"8-bit scales, bnb style (default: {_on(DEFAULTS.double_quant)}).")
ScaleDtypeOpt = typer.Option(None, "--scale-dtype", help=f"{' | '.join(SCALE_DTYPES)} scales (ignored with --double-quant; "
                             f"default: {DEFAULTS.scale_dtype}).")
ScaleSearchOpt = typer.Option(None, "--scale-search", help="Candidate scales per block, 1..16 (1 = plain absmax) "
                              f"(default: {DATA_FREE_SEARCH}; {CALIBRATED_SEARCH}, importance-weighted, with --calib).")
ScaleRefitOpt = typer.Option(None, "--scale-refit/--no-scale-refit",
                             help="Refit each block's scale by least squares to its codes, then code again: lower KL to "
                             "dense, not always lower nll (data-free rtn only; default: off, plain absmax).")
MethodOpt = typer.Option(None, "--method", "-m", help="rtn (round to nearest; with --calib: importance-weighted scales) "
                         f"| gptq (needs --calib) (default: {DEFAULTS.method}).")
CalibOpt = typer.Option(None, "--calib", help="Calibration text (plain or JSONL 'text') the model runs on, block by block "
                        "(default: none, data-free).")
CalibTokensOpt = typer.Option(None, "--calib-tokens", help=f"Calibration tokens to use (default: {DEFAULT_TOKENS}).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the calibration sample.")
DampOpt = typer.Option(None, "--damp", help=f"GPTQ dampening, a fraction of mean(diag H) (default: {DEFAULT_DAMP}).")
ActOrderOpt = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: quantize columns by descending activation "
                           f"energy (default: {_on(DEFAULT_ACT_ORDER)}).")
TargetsOpt = typer.Option(None, "--targets", help="Pattern of tensors to quantize (repeatable); replaces the recipe's "
                          "(default: the 2-D weights of linear layers, not embeddings, lm_head or norms).")
IgnoreOpt = typer.Option(None, "--ignore", help="Pattern of tensors to keep dense (repeatable; default: none).")
OverrideOpt = typer.Option(None, "--override", "-o", help="PATTERN=BITS | PATTERN=skip | PATTERN=key:value,... (repeatable, in order).")

# --force of the bench commands: they have no DST; what it replaces is their --out folder
BenchForceOpt = typer.Option(False, "--force", help="--out: replace the output folder if it exists.")

DTYPE_REMOVED = ("--dtype is ambiguous and was removed: use --data-type (the codebook: int|fp|nf|quantile|dynamic) "
                 "or --torch-dtype (fp32|fp16|bf16)")


def torch_dtype_option(default, help: str):
    """`--torch-dtype` of decode, finetune and generate: `help` says what it applies to."""
    return typer.Option(default, "--torch-dtype", help=f"Torch dtype {help}")


def check_torch_dtype(value: str | None) -> str | None:
    """--torch-dtype as given, or a one-line bad-input error that names the flag (and points a codebook data
    type to --data-type) before any work is done. The API accepts the same names (plus 'original' / 'auto')."""
    from kbitcli.errors import KbitError, bad_input
    from kbitcli.io.dtypes import parse_float

    try:
        parse_float(value, "--torch-dtype")  # the one dtype table decides what is a torch dtype
    except KbitError as e:
        if value in ("int", "fp", "nf", "quantile", "dynamic"):
            raise bad_input(f"{e} (a codebook data type is --data-type of kbit encode)") from None
        raise
    return value


def removed_dtype_option(message: str = DTYPE_REMOVED):
    """The old, ambiguous --dtype, hidden: given any value it prints one line naming the new flags and exits 2
    while the command line is parsed, before the command runs (so nothing is read or written); printed as
    `common.run` prints every bad input."""

    def reject(ctx: typer.Context, value):
        if value is None or ctx.resilient_parsing:
            return value
        import sys

        print(f"kbit: error: {message}", file=sys.stderr)
        raise typer.Exit(2)

    return typer.Option(None, "--dtype", hidden=True, callback=reject, expose_value=False)


RemovedDtypeOpt = removed_dtype_option()


def recipe_from_options(recipe=None, bits=None, block_size=None, dtype=None, double_quant=None, scale_dtype=None,
                        targets=None, ignore=None, override=None, scale_search=None, method=None,
                        scale_refit=None) -> Recipe | None:
    """The Recipe these options describe, or None when none was given (so a command can tell 'use defaults'
    from 'the user asked for this', e.g. to refuse options for an already k-bit MODEL)."""
    given = [recipe, bits, block_size, dtype, double_quant, scale_dtype, targets, ignore, override, scale_search, method,
             scale_refit]
    if all(v is None or v == [] for v in given):
        return None
    return with_flags(load_recipe(recipe), bits=bits, block_size=block_size, dtype=dtype, double_quant=double_quant,
                      scale_dtype=scale_dtype, scale_search=scale_search, method=method, targets=targets,
                      ignore=ignore, overrides=override or (), scale_refit=scale_refit)


def calibration_from_options(calib=None, calib_tokens=None, seed=0, damp=None, act_order=None):
    """The Calibration --calib & co. describe, or None without --calib (then the other options are refused)."""
    from kbitcli.errors import bad_input

    if calib is None:
        extra = [n for n, v in (("--calib-tokens", calib_tokens), ("--damp", damp), ("--act-order", act_order))
                 if v is not None]
        if extra:
            raise bad_input(f"{extra[0]} goes with --calib FILE (calibration text)")
        return None
    c = Calibration(calib, DEFAULT_TOKENS if calib_tokens is None else calib_tokens, seed,
                    DEFAULT_DAMP if damp is None else damp, DEFAULT_ACT_ORDER if act_order is None else act_order)
    c.check()
    return c
