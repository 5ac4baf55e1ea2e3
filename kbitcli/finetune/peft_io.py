"""Adapters in PEFT's on-disk format, so `peft.PeftModel.from_pretrained(dense_model, OUT)` loads them.

    adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora, ...
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)   fp32
                               base_model.model.<module>.lora_B.weight  (out, r)  fp32

target_modules lists the full module names: PEFT matches a list entry against a module name exactly or as
a dotted suffix, so full names select exactly the modules that were trained. Written without importing
peft (it is not a dependency of kbit); the tests load the files with peft itself.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from kbitcli.errors import bad_input
from kbitcli.io.atomic import write_json, write_safetensors
from kbitcli.finetune.config import TrainConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def key(module: str, part: str) -> str:
    return f"{PREFIX}{module}.{part}.weight"


def adapter_tensors(loras: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, lo in loras.items():
        out[key(name, "lora_A")] = lo.lora_A.detach().float()
        out[key(name, "lora_B")] = lo.lora_B.detach().float()
    return out


def adapter_config(cfg: TrainConfig, modules: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(folder: str, loras: dict, cfg: TrainConfig, base_model: str, metadata: dict | None = None) -> None:
    """Weights first, config last: a folder with an adapter_config.json always has its weights."""
    md = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    write_safetensors(os.path.join(folder, WEIGHTS), adapter_tensors(loras), md)
    write_json(os.path.join(folder, CONFIG), adapter_config(cfg, list(loras), base_model))


def read_adapter(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, {module: (A, B)}) of a PEFT LoRA folder."""
    cfg_path, w_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    if not os.path.exists(cfg_path) or not os.path.exists(w_path):
        raise bad_input(f"{folder}: no {CONFIG} + {WEIGHTS}; is it a finished `kbit finetune` output?")
    with open(cfg_path) as fh:
        config = json.load(fh)
    if config.get("peft_type") != "LORA":
        raise bad_input(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(w_path, framework="pt") as fh:
        for k in fh.keys():
            if not k.startswith(PREFIX) or not k.endswith((".lora_A.weight", ".lora_B.weight")):
                raise bad_input(f"{w_path}: unexpected tensor {k!r}; only LoRA A/B weights are supported")
            module, part = k[len(PREFIX):].rsplit(".", 2)[:2]
            pairs.setdefault(module, {})[part] = fh.get_tensor(k)
    out = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise bad_input(f"{w_path}: module {module!r} lacks lora_A or lora_B")
        out[module] = (parts["lora_A"], parts["lora_B"])
    return config, out


def scaling_of(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (r ** 0.5 if config.get("use_rslora") else r)


def apply_adapter(model, folder: str) -> dict:
    """Wrap the model's adapted modules in LoraLinear and load the folder's weights (for inference or tests)."""
    from kbitcli.finetune.lora import attach_lora

    config, pairs = read_adapter(folder)
    missing = [m for m in pairs if m not in dict(model.named_modules())]
    if missing:
        raise bad_input(f"{folder}: adapter module {missing[0]!r} is not in this model; was it trained on another one?")
    loras = attach_lora(model, list(pairs), config["r"], config["lora_alpha"], 0.0, bool(config.get("use_rslora")))
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            loras[name].lora_A.copy_(a)
            loras[name].lora_B.copy_(b)
    return loras
