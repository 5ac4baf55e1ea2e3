"""load_model: a dense Hugging Face folder or a kbit checkpoint folder -> (ready nn.Module in eval mode, tokenizer).

For a kbit checkpoint the transformers model is built from config.json with every parameter on the `meta`
device (buffers such as rotary tables stay real, so they keep their computed values); then each module whose
weight is quantized is replaced by a KbitLinear holding the packed codes, and the dense tensors are assigned
in place. No full-precision copy of a quantized weight is ever allocated.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import KbitCheckpoint, looks_kbit
from kbitcli.models.kbit_linear import KbitLinear, share_tables

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "original", ""):
        return None
    if dtype not in DTYPES:
        raise bad_input(f"dtype {dtype!r}: choose one of fp32, fp16, bf16 (or auto)")
    return DTYPES[dtype]


def read_config(path: str):
    """transformers config of a model folder, without our quantization_config (transformers has no 'kbit' method)."""
    from transformers import AutoConfig

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg_path):
        raise bad_input(f"{path}: loading a model needs a model folder with config.json (a bare weights file "
                        "has no architecture); point at the folder `kbit encode` wrote")
    try:
        with open(cfg_path) as fh:
            raw = json.load(fh)
    except ValueError as e:
        raise bad_input(f"{cfg_path}: not valid JSON ({e})") from None
    quant = raw.pop("quantization_config", None)
    if "model_type" not in raw:
        raise bad_input(f"{cfg_path} has no model_type; it is not a transformers config")
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError) as e:
        raise bad_input(f"{cfg_path}: transformers cannot build this config ({str(e).splitlines()[0]}); "
                        "upgrade transformers or fix config.json") from None
    return config, quant


def model_class(config, override=None):
    """The class config.json names (e.g. LlamaForCausalLM), else AutoModelForCausalLM for causal LMs, else AutoModel."""
    import transformers

    if override is not None:
        return getattr(transformers, override) if isinstance(override, str) else override
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel


@contextlib.contextmanager
def params_on_meta():
    """Every nn.Parameter created inside lands on the meta device (no memory, no init work); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def name_mapper(model_keys: set[str], prefix: str):
    """Checkpoint name -> model state-dict name, trying the base_model_prefix both ways (a BertModel checkpoint
    has `encoder.…`, a BertForMaskedLM model wants `bert.encoder.…`, and the other way round)."""

    def to_model(name: str) -> str | None:
        candidates = [name]
        if prefix:
            candidates += [f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None]
        return next((c for c in candidates if c in model_keys), None)

    return to_model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise bad_input(f"{path}: tokenizer files are present but unreadable ({str(e).splitlines()[0]})") from None


def load_model(path: str, *, dtype=None, device="cpu", model_cls=None, tokenizer: bool = True):
    """(model, tokenizer) for a dense HF folder or a kbit checkpoint folder; model in eval mode on `device`.

    dtype: None keeps each dense tensor's stored dtype; fp32/bf16/fp16 casts them (k-bit layers compute in
    their input's dtype). model_cls: a transformers class (or its name) to use instead of config.json's.
    """
    if not os.path.exists(path):
        raise bad_input(f"{path}: no such file or folder")
    dt = parse_dtype(dtype)
    if looks_kbit(path):
        model = _load_kbit(path, dt, model_cls)
    else:
        from kbitcli.formats.foreign import load_dense as load_foreign

        # bitsandbytes / compressed-tensors / GGUF checkpoints: their weights decoded by kbit's own readers
        foreign = load_foreign(path, dt)
        if foreign is not None:
            model, tok = foreign
            return model.to(device).eval(), (tok if tokenizer else None)
        model = _load_dense(path, dt, model_cls)
    model.to(device).eval()
    share_tables(m for m in model.modules() if isinstance(m, KbitLinear))  # .to() copies shared tables apart
    return model, (load_tokenizer(path) if tokenizer else None)


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
        else:  # e.g. a quantized embedding: no k-bit module for it, so it alone is decoded to a dense tensor
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

    # tie what the config ties, except where one side became a KbitLinear (then both sides were stored)
    kbit_weights = {f"{n}.weight" for n in replaced}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        if target in kbit_weights or source in kbit_weights:
            tied.pop(target)
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
                       "unexpected": unexpected}
    return model


def kbit_modules(model: nn.Module) -> dict[str, KbitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KbitLinear)}


def weight_memory(model: nn.Module) -> dict:
    """Resident bytes of the model's tensors (each tensor once): total, and the part in KbitLinear modules."""
    seen, total, kbit = set(), 0, 0
    owners = {id(t) for m in kbit_modules(model).values() for t in list(m.buffers()) + list(m.parameters())}
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.device)
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
        if id(t) in owners:
            kbit += t.numel() * t.element_size()
    return {"total_bytes": total, "kbit_module_bytes": kbit}
