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
ScaleSearchOpt = typer.Option(None, "--scale-search", help="Candidate scales per block (1 = plain absmax).")
TargetsOpt = typer.Option(None, "--targets", help="Pattern of tensors to quantize (repeatable); replaces the recipe's.")
IgnoreOpt = typer.Option(None, "--ignore", help="Pattern of tensors to keep dense (repeatable).")
OverrideOpt = typer.Option(None, "--override", "-o", help="PATTERN=BITS | PATTERN=skip | PATTERN=key:value,... (repeatable, in order).")


def recipe_from_options(recipe=None, bits=None, block_size=None, dtype=None, double_quant=None, scale_dtype=None,
                        targets=None, ignore=None, override=None, scale_search=None) -> Recipe | None:
    """The Recipe these options describe, or None when none was given (so a command can tell 'use defaults'
    from 'the user asked for this', e.g. to refuse options for an already k-bit MODEL)."""
    given = [recipe, bits, block_size, dtype, double_quant, scale_dtype, targets, ignore, override, scale_search]
    if all(v is None or v == [] for v in given):
        return None
    return with_flags(load_recipe(recipe), bits=bits, block_size=block_size, dtype=dtype, double_quant=double_quant,
                      scale_dtype=scale_dtype, scale_search=scale_search, targets=targets, ignore=ignore,
                      overrides=override or ())
