"""Resume checkpoints: everything a run needs to continue bit for bit, as one safetensors file of tensors.

OUT/checkpoints/step-000100.safetensors holds
    adapter.<PEFT key>              the LoRA A / B weights
    optim.<PEFT key>.<state>        AdamW's step, exp_avg, exp_avg_sq for that weight
    rng.cpu (and rng.cuda.<i>)      the torch RNG state (dropout masks)
and in its header metadata the step, the training settings and the eval loss before training. No pickle
anywhere: it is read back with safetensors (the batches are a function of seed and step; see data.py).
The newest KEEP checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open

from kbitcli.errors import bad_input
from kbitcli.io.atomic import write_safetensors
from kbitcli.finetune.peft_io import adapter_tensors, key

FOLDER = "checkpoints"
KEEP = 2
NAME = re.compile(r"step-(\d+)\.safetensors$")


def _param_keys(loras: dict) -> list[str]:
    # the optimizer's parameter order (see lora.lora_parameters)
    return [key(name, part) for name in loras for part in ("lora_A", "lora_B")]


def save(out_dir: str, step: int, loras: dict, optimizer: torch.optim.Optimizer, info: dict) -> str:
    folder = os.path.join(out_dir, FOLDER)
    os.makedirs(folder, exist_ok=True)
    tensors = {f"adapter.{k}": v for k, v in adapter_tensors(loras).items()}
    state = optimizer.state_dict()["state"]
    for i, k in enumerate(_param_keys(loras)):
        for sk, sv in state.get(i, {}).items():
            tensors[f"optim.{k}.{sk}"] = torch.as_tensor(sv).detach().clone()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    path = os.path.join(folder, f"step-{step:06d}.safetensors")
    write_safetensors(path, tensors, {"step": str(step), "info": json.dumps(info)})
    for old in list_checkpoints(out_dir)[:-KEEP]:
        os.remove(old[1])
    return path


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    folder = os.path.join(out_dir, FOLDER)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, f)) for f in os.listdir(folder) if (m := NAME.match(f))]
    return sorted(found)


def load(path: str) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """(step, info, tensors) of a checkpoint file."""
    try:
        with safe_open(path, framework="pt") as fh:
            md = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        return int(md["step"]), json.loads(md["info"]), tensors
    except Exception as e:  # a damaged or foreign file: say which and what to do
        raise bad_input(f"{path}: not a readable kbit finetune checkpoint ({type(e).__name__}); "
                        "delete it to resume from the one before, or start over with --force") from None


def restore(tensors: dict[str, torch.Tensor], loras: dict, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Put adapter weights, optimizer state and RNG state back (in place)."""
    with torch.no_grad():
        for name, lo in loras.items():
            for part in ("lora_A", "lora_B"):
                k = f"adapter.{key(name, part)}"
                if k not in tensors or tensors[k].shape != getattr(lo, part).shape:
                    raise bad_input(f"{path}: has no {k} of shape {list(getattr(lo, part).shape)}; "
                                    "it was made with other targets or rank")
                getattr(lo, part).copy_(tensors[k])
    state = {}
    for i, k in enumerate(_param_keys(loras)):
        prefix = f"optim.{k}."
        entry = {t[len(prefix):]: v for t, v in tensors.items() if t.startswith(prefix)}
        if entry:
            state[i] = entry
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    try:  # the dropout masks continue where they stopped: without the RNG state the run would not be the same
        torch.set_rng_state(tensors["rng.cpu"])
    except (KeyError, RuntimeError, TypeError):
        raise bad_input(f"{path}: has no usable RNG state (rng.cpu); delete it to resume from the one before, or "
                        "start over with --force") from None
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
