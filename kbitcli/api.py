"""The Python API in one import, for checkpoint files and for any torch nn.Module alike:

    import kbitcli.api as kbit
    kbit.encode("SRC", "DST", recipe="recipes/llama-nf4.yaml")      # files, as `kbit encode` (returns its summary)
    qmodel = kbit.encode(model, recipe="recipes/llama-nf4.yaml")    # a module: a k-bit copy (inplace=True: in place)
    restored = kbit.decode(qmodel)                                  # dense nn.Module again (a copy)
    kbit.save(qmodel, "out/m-nf4"); qmodel = kbit.load("out/m-nf4", model=skeleton)
    model, tok = kbit.load_model("out/m-nf4")                      # a transformers model from its folder

A recipe is a YAML path, a Recipe, or a dict of recipe keys. Files and modules share the plan, the core and the
writer: the same weights and recipe give the same checkpoint bytes from here and from the CLI.
"""

from __future__ import annotations

from torch import nn

from kbitcli.allocate.planner import plan
from kbitcli.calibration.data import Calibration
from kbitcli.decode import decode as decode_file
from kbitcli.encode import encode as encode_file
from kbitcli.inspect import inspect
from kbitcli.models.hf_quantizer import register_with_transformers  # cheap: transformers loads on the call
from kbitcli.models.kbit_conv import KbitConv
from kbitcli.models.kbit_embedding import KbitEmbedding, KbitEmbeddingBag
from kbitcli.models.kbit_linear import KbitLinear
from kbitcli.models.load import load_model
from kbitcli.models.module_io import save
from kbitcli.models.module_io import load as load_module
from kbitcli.models.quantize_module import decode_module, encode_module
from kbitcli.models.quantize_module import weight_memory as memory
from kbitcli.recipes import Recipe, from_dict, load_recipe, with_flags


def recipe_of(recipe) -> Recipe | None:
    """None, a Recipe, a recipe YAML path, or a dict of recipe keys -> Recipe (or None: the defaults)."""
    if recipe is None or isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return from_dict(recipe, "recipe")
    return load_recipe(str(recipe))


def encode(model_or_src, dst: str | None = None, recipe=None, *, inplace: bool = False, **options):
    """encode(nn.Module, recipe=...) -> the k-bit module (a deep copy unless inplace=True);
    encode(SRC, DST, recipe=..., **options) -> the summary dict of `kbit encode SRC DST` (options: force,
    dry_run, fmt, calib, max_shard_size, ...)."""
    if isinstance(model_or_src, nn.Module):
        if dst is not None or options:
            raise TypeError("encode(model, recipe=..., inplace=...) takes no DST or file options; "
                            "use save(qmodel, DST) to write it")
        return encode_module(model_or_src, recipe_of(recipe), inplace=inplace)
    if dst is None:
        raise TypeError("encode(SRC, DST, ...) needs a destination")
    return encode_file(model_or_src, dst, recipe_of(recipe), **options)


def decode(model_or_src, dst: str | None = None, dtype=None, *, inplace: bool = False, **options):
    """decode(k-bit nn.Module) -> a dense nn.Module (a copy unless inplace=True; dtype: a torch dtype for the
    weights, default their original one); decode(SRC, DST, dtype="fp16", force=...) -> `kbit decode`'s summary."""
    if isinstance(model_or_src, nn.Module):
        if dst is not None or options:
            raise TypeError("decode(qmodel, dtype=..., inplace=...) takes no DST or file options")
        return decode_module(model_or_src, inplace=inplace, dtype=dtype)
    if dst is None:
        raise TypeError("decode(SRC, DST, ...) needs a destination")
    return decode_file(model_or_src, dst, dtype, **options)


def load(path: str, model: nn.Module | None = None, **options) -> nn.Module:
    """The kbit checkpoint at path as a module: read into `model` (a skeleton of the architecture, filled in
    place) or, without one, the transformers model its config.json names (load_model without the tokenizer)."""
    if model is None:
        return load_model(path, tokenizer=False, **options)[0]
    return load_module(path, model, **options)


__all__ = ["Calibration", "encode", "decode", "save", "load", "memory", "plan", "inspect", "load_model",
           "KbitLinear", "KbitConv", "KbitEmbedding", "KbitEmbeddingBag", "Recipe", "load_recipe", "with_flags",
           "from_dict", "register_with_transformers", "encode_file", "decode_file"]
