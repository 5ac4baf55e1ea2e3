"""kbit as a transformers quantizer: after `register_with_transformers()` (`kbit.register_with_transformers()` in
the Python API), `AutoModelForCausalLM.from_pretrained(<kbit folder>)` returns the k-bit model that load_model
builds (KbitLinear / KbitEmbedding modules, no full-precision copy of a quantized weight) instead of warning
"Unknown quantization type, got kbit" and initialising every quantized weight at random.

transformers reads config.json's quantization_config ({"quant_method": "kbit", ...}), finds the classes
registered under "kbit" and calls the quantizer's hooks around its own loader:
- before the weights load, each module whose weight the checkpoint stores quantized (and an output layer tied to
  one that the checkpoint does not store) has its tensors taken out of the state dict, so the loader has no
  full-precision weight to allocate, initialise or report missing; the keys it cannot read (codes, scales,
  tables) go on the model's ignore list; it loads the dense tensors (norms, unquantized embeddings) itself;
- after loading, those modules are swapped for the ones load_model builds from the same folder.

Why not KbitLinear shells filled by transformers' weight converters: those map checkpoint keys to module
parameters one to one, but a kbit file stores a data type's codebook once for all its tensors and each tensor's
spec sits in the safetensors header, and the converter API changes between 5.x releases. Reusing load_model
keeps one code path for every k-bit module (Conv1D, tied embeddings, dense fallbacks), so both loaders give the
same model by construction.

Importing this module is cheap: transformers is imported by register_with_transformers().
"""

from __future__ import annotations

import functools
import os
import re

import torch
from torch import nn

from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.formats.kbit_write import QUANT_METHOD
from kbitcli.formats.source import KBIT_PARTS  # a quantized tensor's stored parts
from kbitcli.hf import name_mapper
from kbitcli.models.load import load_model, relink



def hold_out_of_loading(module: nn.Module) -> None:
    """Take a module's (meta) tensors out of the state dict while transformers loads: it then has nothing to
    allocate, initialise or report missing there. They stay on the module as plain attributes marked initialised,
    so a model's _init_weights that reaches into it (GPT-2's touches `c_proj.weight` from the parent) still works."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                del table[name]
                if t is not None:
                    t = t.detach()
                    t._is_hf_initialized = True
                object.__setattr__(m, name, t)


def checkpoint_folder(checkpoint_files) -> str:
    folders = {os.path.dirname(os.path.abspath(f)) for f in checkpoint_files or ()}
    if len(folders) != 1:
        raise bad_input(f"kbit checkpoints load from one folder; transformers resolved {sorted(folders) or 'no files'}")
    return folders.pop()


def modules_kbit_supplies(model: nn.Module, ck: KbitCheckpoint) -> tuple[list[str], list[str]]:
    """(names of the model's modules load_model will supply, checkpoint keys transformers must not load or report).

    Pops from model.all_tied_weights_keys the ties that involve a k-bit module, as load_model does: transformers
    would otherwise tie a `.weight` the k-bit module does not have."""
    to_model = name_mapper(set(model.state_dict()), getattr(model, "base_model_prefix", ""))
    module_of = {n: t.rpartition(".")[0] for n in ck.names if (t := to_model(n)) is not None}
    stored = {to_model(n) for n in ck.names}
    pending = {module_of[n] for n in ck.names if ck.is_quantized(n) and n in module_of}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        out, src = target.rpartition(".")[0], source.rpartition(".")[0]
        if out in pending or src in pending:
            tied.pop(target)
            if target not in stored:  # an output layer tied to a k-bit embedding: load_model builds it
                pending.add(out)
    ignored = [k for k in ck.stored if k.startswith("kbit.codebook.")]
    for n in ck.names:
        if module_of.get(n) in pending:
            ignored += [f"{n}.{p}" for p in KBIT_PARTS] if ck.is_quantized(n) else [n]
    return sorted(pending), ignored


def kbit_device(model: nn.Module) -> torch.device:
    """Where transformers put the dense tensors (device_map): the k-bit modules go there too."""
    for p in list(model.parameters()) + list(model.buffers()):
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def register_with_transformers():
    """Register kbit's quantization config and quantizer with transformers (once; later calls are no-ops).
    Returns the quantizer class."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, HfQuantizer,
                                              register_quantization_config, register_quantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class KbitConfig(QuantizationConfigMixin):
        """config.json's quantization_config as kbit writes it, kept whole (to_dict gives it back)."""

        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            self.quant_method = QUANT_METHOD

    class KbitHfQuantizer(HfQuantizer):
        requires_calibration = True  # a kbit checkpoint is made by `kbit encode`; transformers cannot make one

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.dtype, self.folder, self.pending = None, None, []

        def validate_environment(self, *args, device_map=None, **kwargs):
            devices = set(device_map.values()) if isinstance(device_map, dict) else set()
            if len(devices) > 1 or "disk" in devices:
                raise bad_input(f"device_map {device_map}: a kbit model loads on one device; pass device_map=None "
                                "or a single device")

        def update_attn_implementation(self, config):
            # the one hook that sees config before transformers resolves the weight files: a kbit folder may
            # carry a `transformers_weights` that is no file name, so that transformers without kbit stops with
            # an error quoting it (docs/INTEROP.md); with kbit the weights are the usual model*.safetensors
            named = getattr(config, "transformers_weights", None)
            if isinstance(named, str) and not named.endswith((".safetensors", ".safetensors.index.json")):
                config.transformers_weights = None
            return config

        def update_dtype(self, dtype):
            self.dtype = dtype  # preprocess_model does not pass it on; load_model casts the dense tensors to it
            return dtype

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            self.folder = checkpoint_folder(checkpoint_files)
            self.pending, ignored = modules_kbit_supplies(model, KbitCheckpoint(self.folder))
            for name in self.pending:
                hold_out_of_loading(model.get_submodule(name))
            if ignored:  # instance attribute: what this model's loader leaves out of its report
                pattern = "(?:^|\\.)(?:" + "|".join(re.escape(k) for k in ignored) + ")$"
                model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {pattern}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            built, _ = load_model(self.folder, dtype=self.dtype, model_cls=type(model), tokenizer=False)
            device = kbit_device(model)
            for name in self.pending:
                model.set_submodule(name, built.get_submodule(name).to(device))
            model.kbit_info = built.kbit_info
            relink(model)  # .to() copied tied pairs and shared tables apart
            return model

        def is_serializable(self):
            return False  # save with kbit's own writer (`kbit encode`), which keeps the format's metadata

        @property
        def is_trainable(self) -> bool:
            return False

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(KbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(KbitHfQuantizer)
    return AUTO_QUANTIZER_MAPPING[QUANT_METHOD]

