"""Hugging Face model helpers every layer above uses: the config of a folder, the model class it names, a model
built on the `meta` device (no memory), its linear modules, and checkpoint-name -> module-name mapping.

They sit below formats/ (the exports need the linear layers), calibration/ (it runs the model block by
block) and models/ (loading), so none of those imports another upward.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from kbitcli.errors import bad_input


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

    auto = AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
    # the concrete class (callers build with its _from_config, which Auto classes lack)
    return auto._model_mapping[type(config)]


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


def linear_modules(config: dict) -> set[str]:
    """Names of the nn.Linear modules of the transformers model config.json describes (built on `meta`)."""
    from transformers import AutoConfig

    raw = {k: v for k, v in config.items() if k != "quantization_config"}
    if "model_type" not in raw:
        raise bad_input("config.json has no model_type; it is not a transformers config")
    try:
        cfg = AutoConfig.for_model(**raw)
    except (ValueError, KeyError) as e:
        raise bad_input(f"config.json: transformers cannot build this model ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):  # no memory, no init: only the module tree is wanted
        model = model_class(cfg)._from_config(cfg)
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def module_of(name: str, linears: set[str]) -> str | None:
    """The linear module a checkpoint tensor `X.weight` belongs to (allowing a missing/extra base prefix)."""
    if not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    if module in linears:
        return module
    hits = [m for m in linears if m.endswith("." + module) or module.endswith("." + m)]
    return module if len(hits) == 1 else None
