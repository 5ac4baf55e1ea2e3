"""The encode options (`--recipe`, `-k`, `-b`, `-t`, ...) for commands that quantize on the fly (bench ...).

Declared once so every command spells them as `kbit encode` does; `recipe_from_options` turns them into a
Recipe exactly as `kbit encode` would (recipe file first, flags on top).

Two different things are called "dtype" in kbit, so no flag is: `--data-type/-t` is the codebook data type
(int | fp | nf | quantile | dynamic; the recipe key `dtype`) of encode and bench, `--torch-dtype` the torch
dtype (fp32 | fp16 | bf16) that decode, finetune and generate compute or write in. The old `--dtype` stays as a
hidden option (`RemovedDtypeOpt`) on every command that had it, and only says which of the two to use.
"""

from __future__ import annotations

import typer

from kbitcli.recipes import Recipe, load_recipe, with_flags

RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/).")
BitsOpt = typer.Option(None, "--bits", "-k", help="k: bits per weight, 2..8.")
BlockSizeOpt = typer.Option(None, "--block-size", "-b", help="Power of two 16..4096, 'row' or 'tensor'.")
DataTypeOpt = typer.Option(None, "--data-type", "-t",
                           help="Codebook data type: int | fp | nf | quantile | dynamic (recipe key `dtype`).")
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

TORCH_DTYPES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")
DTYPE_REMOVED = ("--dtype is ambiguous and was removed: use --data-type (the codebook: int|fp|nf|quantile|dynamic) "
                 "or --torch-dtype (fp32|fp16|bf16)")


def torch_dtype_option(default, help: str):
    """`--torch-dtype` of decode, finetune and generate: `help` says what it applies to."""
    return typer.Option(default, "--torch-dtype", help=f"Torch dtype {help}")


def check_torch_dtype(value: str | None) -> str | None:
    """--torch-dtype as given, or a one-line bad-input error that names the flag (and points a codebook data
    type to --data-type) before any work is done. The API accepts the same names (plus 'original' / 'auto')."""
    from kbitcli.errors import bad_input

    if value is None or value in ("", "original", "auto") or value in TORCH_DTYPES:
        return value
    codebook = value in ("int", "fp", "nf", "quantile", "dynamic")
    hint = " (a codebook data type is --data-type of kbit encode)" if codebook else ""
    raise bad_input(f"--torch-dtype {value!r}: choose one of fp32, fp16, bf16 (or 'original'){hint}")


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
