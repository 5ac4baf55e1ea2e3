"""load_model: a dense Hugging Face folder or a kbit checkpoint folder -> (ready nn.Module in eval mode, tokenizer).

For a kbit checkpoint the transformers model is built from config.json with every parameter on the `meta`
device (buffers such as rotary tables stay real, so they keep their computed values); then each module whose
weight is quantized is replaced by a KbitLinear holding the packed codes (a quantized nn.Embedding table by a
KbitEmbedding, and an output layer tied to it by a KbitLinear over the same tensors), and the dense tensors are
assigned in place. No full-precision copy of a quantized weight is ever allocated.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from kbitcli.core.blockwise import check_codes
from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.formats.registry import detect, open_reader
from kbitcli.hf import load_tokenizer, model_class, name_mapper, params_on_meta, read_config
from kbitcli.io.dtypes import parse_float
from kbitcli.io.folder import missing_path_error
from kbitcli.models.kbit_embedding import KbitEmbedding, tie_output
from kbitcli.models.kbit_linear import KbitLinear, share_tables
from kbitcli.models.quantize_module import weight_memory


def load_model(path: str, *, dtype=None, device="cpu", model_cls=None, tokenizer: bool = True):
    """(model, tokenizer) for a dense HF folder or a kbit checkpoint folder; model in eval mode on `device`.

    dtype: None keeps each dense tensor's stored dtype; fp32/bf16/fp16 casts them (k-bit layers compute in
    their input's dtype). model_cls: a transformers class (or its name) to use instead of config.json's.
    """
    if not os.path.exists(path):
        raise missing_path_error(path)
    dt = parse_float(dtype, "--torch-dtype")
    fmt = detect(path)
    if fmt == "kbit":
        model = _load_kbit(path, dt, model_cls)
    else:
        if fmt != "dense":  # bitsandbytes / compressed-tensors / GGUF: weights decoded by kbit's own readers
            model, tok = _load_foreign(open_reader(path, fmt), dt, tokenizer)
            return model.to(device).eval(), tok
        model = _load_dense(path, dt, model_cls)
    relink(model.to(device).eval())
    return model, (load_tokenizer(path) if tokenizer else None)


def relink(model: nn.Module) -> None:
    """Share again what `.to()` copied apart (it copies each module's buffers on its own): a tied k-bit lm_head
    and its embedding's tensors (model.kbit_info["tied"]), and the codebook tables KbitLinear modules share."""
    for out_name, emb_name in getattr(model, "kbit_info", {}).get("tied", {}).items():
        tie_output(model.get_submodule(out_name), model.get_submodule(emb_name))
    share_tables(m for m in model.modules() if isinstance(m, KbitLinear))


def _load_foreign(reader, dtype, tokenizer: bool):
    """(transformers model, tokenizer or None) for a bnb / compressed-tensors / GGUF checkpoint, its weights
    dequantized by kbit's readers: what `kbit bench` and `kbit generate` run for any of them without
    bitsandbytes, compressed-tensors or llama.cpp."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers import initialization as hf_init

    path = reader.path
    raw = {k: v for k, v in (reader.config or {}).items() if k != "quantization_config"}
    if "model_type" not in raw:
        raise bad_input(f"{path}: no config.json with a model_type; cannot build the model")
    config = AutoConfig.for_model(**raw)
    cls = model_class(config)
    extra = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters and \
            not any(n.startswith(("pooler.", "bert.pooler.")) for n in reader.names):
        extra["add_pooling_layer"] = False  # a BERT GGUF carries no pooler (llama.cpp pools by itself)
    with params_on_meta(), hf_init.no_init_weights():  # parameters cost nothing until assigned; buffers stay real
        model = cls._from_config(config, **extra)
    keys = set(model.state_dict())
    state = {n: reader.tensor(n, dtype) for n in reader.names if n in keys}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if meta:
        raise bad_input(f"{path}: the checkpoint has no tensor for {meta[0]!r} ({len(meta)} missing)")
    if dtype is not None:
        model.to(dtype)
    tok = None
    if tokenizer and reader.format == "gguf":
        if reader.meta.get("tokenizer.ggml.tokens"):
            tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    elif tokenizer:
        tok = load_tokenizer(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    return model.eval(), tok


def _load_dense(path: str, dtype, model_cls):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bar on stderr would ignore --quiet and --json
    config, _ = read_config(path)
    cls = model_class(config, model_cls)
    try:
        return cls.from_pretrained(path, dtype=dtype) if dtype is not None else cls.from_pretrained(path)
    except OSError as e:
        raise bad_input(f"{path}: transformers could not load it ({str(e).splitlines()[0]})") from None


def _load_kbit(path: str, dtype, model_cls):
    from transformers import GenerationConfig
    from transformers import initialization as hf_init
    from transformers.pytorch_utils import Conv1D

    ck = KbitCheckpoint(path)
    config, quant = read_config(path)
    cls = model_class(config, model_cls)

    with params_on_meta(), hf_init.no_init_weights():
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    to_model = name_mapper(set(model.state_dict()), getattr(model, "base_model_prefix", ""))

    def dense(name: str) -> torch.Tensor:
        t = ck.dense(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    where = {}  # model name -> checkpoint name
    for name in ck.names:
        target = to_model(name)
        if target is not None:
            where.setdefault(target, name)
    consumed, replaced, dense_fallback = set(), [], []
    state: dict[str, torch.Tensor] = {}
    for name in ck.names:
        target = to_model(name)
        if not ck.is_quantized(name) or target is None:
            continue
        module_name, _, leaf = target.rpartition(".")
        module = model.get_submodule(module_name)
        qt = ck.quantized(name)
        check_codes(qt, name)  # modules decode without looking: one check on load
        if leaf == "weight" and isinstance(module, (nn.Linear, Conv1D)):
            bias = None
            if getattr(module, "bias", None) is not None:
                src_bias = where.get(f"{module_name}.bias")
                if src_bias is None:
                    raise bad_input(f"{path}: {module_name} has a bias but the checkpoint holds no {module_name}.bias")
                bias = dense(src_bias)
                consumed.add(src_bias)
            model.set_submodule(module_name, KbitLinear.from_quantized(qt, bias, transposed=isinstance(module, Conv1D)))
            replaced.append(module_name)
        elif leaf == "weight" and type(module) is nn.Embedding and module.max_norm is None and len(qt.shape) == 2:
            # a plain lookup table only: a subclass may do more in forward (e.g. scale by sqrt(dim)), so it
            # takes the dense fallback below
            model.set_submodule(module_name, KbitEmbedding.from_quantized(qt, module.padding_idx, dtype or qt.orig_dtype))
            replaced.append(module_name)
        else:  # e.g. a quantized conv or embedding subclass: no k-bit module for it, so it alone is decoded dense
            state[target] = ck.tensor(name, dtype or qt.orig_dtype)
            dense_fallback.append(name)
        consumed.add(name)

    share_tables(m for m in model.modules() if isinstance(m, KbitLinear))
    model_keys = set(model.state_dict())
    unexpected = []
    for name in ck.names:
        if name in consumed:
            continue
        target = to_model(name)
        if target is None or target not in model_keys:
            unexpected.append(name)
            continue
        state[target] = dense(name)
    model.load_state_dict(state, strict=False, assign=True)

    # tie what the config ties, except where one side became a k-bit module: an output layer the checkpoint does
    # not store, tied to a k-bit embedding, becomes a KbitLinear over the embedding's own tensors; otherwise both
    # sides were stored and each keeps its own
    kbit_weights = {f"{n}.weight" for n in replaced}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tied_kbit = {}
    for target, source in list(tied.items()):
        if target in kbit_weights or source in kbit_weights:
            tied.pop(target)
            out_name, src_name = target.rpartition(".")[0], source.rpartition(".")[0]
            out, src = model.get_submodule(out_name), model.get_submodule(src_name)
            if isinstance(src, KbitEmbedding) and isinstance(out, nn.Linear) and out.weight.device.type == "meta":
                bias = out.bias if out.bias is not None and out.bias.device.type != "meta" else None
                if out.bias is not None and bias is None:
                    raise bad_input(f"{path}: {out_name} has a bias but the checkpoint holds no {out_name}.bias")
                model.set_submodule(out_name, src.tied_linear(bias))
                tied_kbit[out_name] = src_name
    missing = {k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"}
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    still = [k for k, v in model.named_parameters() if v.device.type == "meta"]
    still += [k for k, v in model.named_buffers() if v.device.type == "meta"]
    if still:
        raise bad_input(f"{path}: the checkpoint has no tensor for {still[0]!r} ({len(still)} missing); "
                        f"it does not fit {cls.__name__}")

    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen) and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.kbit_info = {"quantization_config": quant, "kbit_modules": replaced, "dense_fallback": dense_fallback,
                       "unexpected": unexpected, "tied": tied_kbit}
    return model


def kbit_modules(model: nn.Module) -> dict[str, KbitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KbitLinear)}


__all__ = ["load_model", "relink", "kbit_modules", "weight_memory"]  # weight_memory: where callers found it
