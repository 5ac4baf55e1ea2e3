"""encode / decode any torch nn.Module in memory: the Python API's `kbit.encode(model)` and `kbit.decode(qmodel)`.

The model's tensors are planned exactly as a checkpoint file's are (plan.make_plan over the names and shapes of
its state dict, so a recipe addresses `named_modules()` names as it addresses tensor names in a file, and
every recipe error comes before any work); each planned weight is quantized by the core (`blockwise.quantize`,
the function `kbit encode` calls) and its module replaced by the k-bit module that holds it:

    nn.Linear (and transformers' Conv1D)  -> KbitLinear          nn.Conv1d / nn.Conv2d -> KbitConv
    nn.Embedding                          -> KbitEmbedding       nn.EmbeddingBag       -> KbitEmbeddingBag

A planned tensor that is not the weight of one of these is refused up front, naming it (no silent dense
fallback). A tensor stored under two names (a tied lm_head) is planned once, under the name the state dict
lists first, as safetensors and `save_pretrained` keep it; the other module then shares the k-bit tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kbitcli.core.blockwise import quantize
from kbitcli.errors import bad_input
from kbitcli.models.kbit_conv import KbitConv
from kbitcli.models.kbit_embedding import KbitEmbedding, KbitEmbeddingBag, tie_output
from kbitcli.models.kbit_linear import KbitLinear, share_tables
from kbitcli.plan import Plan, make_plan
from kbitcli.recipes import Recipe

KBIT_MODULES = (KbitLinear, KbitConv, KbitEmbedding)  # KbitEmbeddingBag is a KbitEmbedding


def named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor, each tensor once in state-dict order; alias name -> the name kept for it)."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        # one tensor under two names (a tied lm_head: one Parameter, or k-bit buffers that are views of one
        # tensor); an empty or meta tensor has no memory to share (every meta data_ptr is 0): only the object
        real = t.numel() and t.device.type != "meta"
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if real else (id(t),)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            kept[name] = t
    return kept, aliases


def owner(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return module_name, model.get_submodule(module_name), leaf


def _is_conv1d_hf(module: nn.Module) -> bool:  # transformers' Conv1D (GPT-2): a linear layer stored [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or _is_conv1d_hf(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv"
    if type(module) is nn.Embedding and module.max_norm is None:  # a subclass may do more in forward
        return "embedding"
    if type(module) is nn.EmbeddingBag and module.max_norm is None:
        return "bag"
    return None


def plan_module(model: nn.Module, recipe: Recipe) -> Plan:
    """The plan `kbit encode` would make for a checkpoint holding this model's state dict; every quantized
    tensor checked to be the weight of a module that has a k-bit form."""
    tensors, _ = named_tensors(model)
    meta = [n for n, t in tensors.items() if t.device.type == "meta"]
    if meta:
        raise bad_input(f"{meta[0]!r} is on the meta device ({len(meta)} such tensors); load the weights first")
    plan = make_plan(((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()), recipe)
    for tp in plan.quantized:
        module_name, module, leaf = owner(model, tp.name)
        if leaf != "weight" or _kind(module) is None:
            raise bad_input(f"{tp.name}: a {type(module).__name__} {leaf!r} has no k-bit module (k-bit modules: "
                            "Linear, Conv1d/Conv2d, Embedding, EmbeddingBag); add it to the recipe's ignore list")
    return plan


def k_bit_module(qt, module: nn.Module) -> nn.Module:
    """The k-bit module that computes what `module` does, holding qt as its weight."""
    kind = _kind(module)
    if kind is None:
        raise ValueError(f"a {type(module).__name__} has no k-bit module")
    if kind == "linear":
        bias = None if module.bias is None else module.bias.detach()
        return KbitLinear.from_quantized(qt, bias, transposed=_is_conv1d_hf(module))
    if kind == "conv":
        return KbitConv.from_quantized(qt, module)
    if kind == "embedding":
        return KbitEmbedding.from_quantized(qt, module.padding_idx, module.weight.dtype)
    return KbitEmbeddingBag.from_bag(qt, module)


def encode_module(model: nn.Module, recipe: Recipe | None = None, *, inplace: bool = False) -> nn.Module:
    """`model` with every weight the recipe targets held k-bit (a deep copy unless inplace). The plan is kept
    as `model.kbit_plan`: what `save` writes and `kbit inspect` would show."""
    recipe = recipe or Recipe()
    plan = plan_module(model, recipe)  # every error before any work or any change to the model
    if not inplace:
        # the copy shares the weights about to be replaced (never written to) instead of copying them: peak
        # memory is the dense model plus the k-bit one, not two dense models
        tensors, _ = named_tensors(model)
        model = copy.deepcopy(model, memo={id(tensors[tp.name]): tensors[tp.name] for tp in plan.quantized})
    tensors, aliases = named_tensors(model)
    replaced: dict[str, nn.Module] = {}
    for tp in plan.quantized:
        module_name, module, _ = owner(model, tp.name)
        qt = quantize(tensors[tp.name].detach(), tp.spec, tp.name)
        replaced[tp.name] = k_bit_module(qt, module)
        model.set_submodule(module_name, replaced[tp.name])
    for alias, kept in aliases.items():  # the other side of a tie shares the k-bit tensors
        if kept in replaced:
            alias_module, module, _ = owner(model, alias)
            model.set_submodule(alias_module, _tied(replaced[kept], module, alias))
    share_tables(m for m in model.modules() if isinstance(m, KbitLinear))
    model.kbit_plan = plan
    return model


def _tied(kbit: nn.Module, module: nn.Module, name: str) -> nn.Module:
    if isinstance(kbit, KbitEmbedding) and _kind(module) == "linear" and not _is_conv1d_hf(module):
        out = kbit.tied_linear(None if module.bias is None else module.bias.detach())
        tie_output(out, kbit)  # the very same tensor objects, so the state dict lists them once
        return out
    if isinstance(kbit, KbitLinear) and _kind(module) == "linear" and _is_conv1d_hf(module) == kbit.transposed:
        return KbitLinear.from_quantized(kbit.quantized_tensor(), None if module.bias is None else module.bias.detach(),
                                         transposed=kbit.transposed)
    if isinstance(kbit, KbitLinear) and not kbit.transposed and _kind(module) == "embedding":
        return KbitEmbedding.from_quantized(kbit.quantized_tensor(), module.padding_idx, module.weight.dtype)
    raise bad_input(f"{name} shares its weight with a {type(kbit).__name__}, which it cannot share k-bit; "
                    "untie the weights or keep both dense (recipe ignore)")


def decode_module(model: nn.Module, *, inplace: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A dense model again: every k-bit module replaced by the torch module it came from, its weight decoded
    (in its original dtype unless `dtype`). Modules that shared k-bit tensors share the dense weight."""
    if not inplace:
        model = copy.deepcopy(model)
    dense: dict[int, nn.Parameter] = {}  # codes tensor -> decoded weight, for ties
    for name, m in list(model.named_modules()):
        if not isinstance(m, KBIT_MODULES):
            continue
        key = m.codes.data_ptr()
        model.set_submodule(name, _dense(m, dense.get(key), dtype))
        dense.setdefault(key, model.get_submodule(name).weight)
    if hasattr(model, "kbit_plan"):
        del model.kbit_plan
    return model


def _dense(m: nn.Module, shared: nn.Parameter | None, dtype) -> nn.Module:
    dt = dtype or m.orig_dtype
    with torch.device("meta"):  # no throw-away random init
        if isinstance(m, KbitLinear) and m.transposed:
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(m.out_features, m.in_features)
        elif isinstance(m, KbitLinear):
            out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, KbitConv):
            cls = nn.Conv1d if len(m.kernel_size) == 1 else nn.Conv2d
            out = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      bias=m.bias is not None, padding_mode=m.padding_mode)
        elif isinstance(m, KbitEmbeddingBag):
            out = nn.EmbeddingBag(m.num_embeddings, m.embedding_dim, mode=m.mode, padding_idx=m.padding_idx,
                                  include_last_offset=m.include_last_offset)
        else:
            out = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
    if shared is not None and shared.shape == _weight_shape(m):
        out.weight = shared
    else:
        w = m.dequantize_table(dt) if isinstance(m, KbitEmbedding) else m.dequantize_weight(dt)
        if isinstance(m, KbitLinear) and m.transposed:  # dequantize_weight gives [out, in]; Conv1D stores [in, out]
            w = w.t()
        out.weight = nn.Parameter(w.reshape(_weight_shape(m)).contiguous(), requires_grad=True)
    if getattr(out, "bias", None) is not None:
        out.bias = nn.Parameter(torch.zeros(out.bias.shape, dtype=dt) if m.bias is None else m.bias.detach().to(dt))
    return out


def _weight_shape(m: nn.Module) -> tuple[int, ...]:
    if isinstance(m, KbitLinear):
        return (m.in_features, m.out_features) if m.transposed else (m.out_features, m.in_features)
    return m.shape


def kbit_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KBIT_MODULES)}


def weight_memory(model: nn.Module) -> dict:
    """Resident bytes of the model's tensors (each tensor once): total, and the part held by k-bit modules."""
    seen, total, kbit = set(), 0, 0
    owners = {id(t) for m in model.modules() if isinstance(m, KBIT_MODULES) for t in list(m.buffers()) + list(m.parameters())}
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.device)
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
        kbit += t.numel() * t.element_size() if id(t) in owners else 0
    return {"total_bytes": total, "kbit_module_bytes": kbit}
