"""save / load any k-bit nn.Module in the native format: the Python API's `kbit.save(qmodel, DST)` and
`kbit.load(DST, model=skeleton)`.

save() is `kbit encode`'s own writer (formats/kbit_write.export) fed from memory: the model's state dict is
the source, and the tensors its k-bit modules already hold are written as they are (nothing is quantized a
second time). The same weights and recipe therefore give the same bytes from Python and from the CLI
(tests/test_module_api.py checks it). load() reads a kbit checkpoint into a skeleton of the same architecture:
each quantized weight becomes the k-bit module for the skeleton's module, every other tensor is assigned.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kbitcli.core.blockwise import check_codes
from kbitcli.errors import bad_input
from kbitcli.formats import kbit_write
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.formats.source import KBIT_PARTS
from kbitcli.io.atomic import check_destination
from kbitcli.io.folder import missing_path_error
from kbitcli.io.manifest import read_manifest
from kbitcli.models.kbit_linear import KbitLinear, share_tables
from kbitcli.models.quantize_module import _tied, k_bit_module, kbit_modules, named_tensors, owner
from kbitcli.plan import Plan, TensorPlan, assign_shards, parse_size
from kbitcli.recipes import Recipe, recipe_record

DEFAULT_SHARD = "5GB"


class ModuleSource:
    """A model's state dict seen through the dense-source protocol the writers read (formats/source.py)."""

    format = "dense"

    def __init__(self, model: nn.Module, folder: bool):
        self.model, self.is_folder, self.files = model, folder, []
        self.tensors, self.aliases = named_tensors(model)
        self.names = list(self.tensors)
        self.path = f"python:{type(model).__module__}.{type(model).__qualname__}"
        config = getattr(model, "config", None)  # a transformers model: its config, as save_pretrained writes it
        self.config = config.to_dict() if hasattr(config, "to_dict") else None
        if self.config is not None and not self.config.get("architectures"):  # a model built from a bare config
            self.config["architectures"] = [type(model).__name__]  # names the class that loads it back

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach().contiguous()

    def write_side_files(self, folder: str) -> None:
        """Nothing beside the weights: a tokenizer or processor is the caller's to save."""


def module_plan(model: nn.Module, shard_bytes: int | None) -> tuple[Plan, dict]:
    """(plan, name -> QuantizedTensor) for what the model holds now: each k-bit module's weight as a quantized
    tensor (a tied one, whose tensors another module holds, is not stored again), everything else dense. The
    order, rules and block labels are encode's (model.kbit_plan) where they still hold, so Python and the CLI
    write the same file."""
    tensors, _ = named_tensors(model)
    quantized, parts = {}, set()
    for name, m in kbit_modules(model).items():
        parts.update(f"{name}.{p}" for p in KBIT_PARTS)
        if f"{name}.codes" in tensors:
            quantized[f"{name}.weight"] = m.quantized_tensor()
    current = [f"{n[:-len('.codes')]}.weight" if n in parts and n.endswith(".codes") else n
               for n in tensors if n not in parts or n.endswith(".codes")]
    recorded = {t.name: t for t in getattr(model, "kbit_plan", Plan([], Recipe())).tensors}
    rank = {n: i for i, n in enumerate(recorded)}
    current.sort(key=lambda n: rank.get(n, len(rank)))  # stable: names encode never saw keep their place, last
    plans = []
    for name in current:
        old = recorded.get(name)
        if name in quantized:
            qt = quantized[name]
            same = old is not None and old.spec == qt.spec and old.shape == tuple(qt.shape)
            plans.append(TensorPlan(name, tuple(qt.shape), qt.orig_dtype, qt.spec, old.rule if same else "k-bit module",
                                    old.block_label if same else qt.spec.block_size))
        else:
            t = tensors[name]
            same = old is not None and old.spec is None
            plans.append(TensorPlan(name, tuple(t.shape), t.dtype, None, old.rule if same else "dense"))
    encoded = getattr(model, "kbit_plan", None)
    plan = Plan(plans, encoded.recipe if encoded is not None else Recipe())
    plan.shards = assign_shards(plans, shard_bytes)
    return plan, quantized


def save(model: nn.Module, dst: str, *, force: bool = False, max_shard_size: str | int = DEFAULT_SHARD,
         progress=None) -> dict:
    """Write `model` (k-bit modules and all) to dst in the native format: a folder, or one file when dst ends
    in .safetensors. Returns the summary `kbit encode --json` prints."""
    from kbitcli.progress import NullProgress

    folder = not dst.endswith(".safetensors")
    check_destination(dst, force, folder=folder)
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    src = ModuleSource(model, folder)
    plan, quantized = module_plan(model, limit if folder else None)
    return kbit_write.export(src, src.path, dst, plan, plan.recipe, recipe_record(plan.recipe), force=force,
                             dry_run=False,
                             progress=progress or NullProgress(), max_shard_bytes=limit, prequantized=quantized)


def load(path: str, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """The kbit checkpoint at path read into `model` (a skeleton of the same architecture, in place): each
    quantized weight's module becomes its k-bit module, every other tensor is assigned (a skeleton on the
    meta device costs nothing). strict: every tensor of the skeleton must be in the checkpoint and vice versa."""
    if not os.path.exists(path):
        raise missing_path_error(path)
    ck = KbitCheckpoint(path)
    tensors, aliases = named_tensors(model)
    unknown = [n for n in ck.names if n not in tensors]
    if unknown:
        raise bad_input(f"{path}: tensor {unknown[0]!r} has no place in {type(model).__name__} ({len(unknown)} such); "
                        "pass a skeleton of the architecture the checkpoint was saved from")
    replaced, state = {}, {}
    for name in ck.names:
        if not ck.is_quantized(name):
            state[name] = _checked(ck.dense(name), tensors[name], name, path)
            continue
        qt = ck.quantized(name)
        check_codes(qt, name)  # modules decode without looking: one check on load
        module_name, module, leaf = owner(model, name)
        if tuple(qt.shape) != tuple(tensors[name].shape):
            raise bad_input(f"{path}: {name} is {list(qt.shape)} in the checkpoint but {list(tensors[name].shape)} in "
                            f"{type(model).__name__}; pass a skeleton of the same architecture")
        try:
            replaced[name] = k_bit_module(qt, module)
        except (AttributeError, TypeError, ValueError, KeyError):
            raise bad_input(f"{path}: {name} is quantized but {module_name} is a {type(module).__name__}, which "
                            "has no k-bit module; pass a skeleton of the architecture it was saved from") from None
        model.set_submodule(module_name, replaced[name])
    if strict:
        missing = [n for n in tensors if n not in state and n not in replaced]
        if missing:
            raise bad_input(f"{path}: no tensor for {missing[0]!r} ({len(missing)} missing); pass a skeleton of the "
                            "architecture it was saved from")
    model.load_state_dict(state, strict=False, assign=True)
    for alias, kept in aliases.items():
        if kept in replaced:
            alias_module, module, _ = owner(model, alias)
            model.set_submodule(alias_module, _tied(replaced[kept], module, alias))
    share_tables(m for m in model.modules() if isinstance(m, KbitLinear))
    model.kbit_plan = _stored_plan(ck, replaced)
    return model


def _stored_plan(ck: KbitCheckpoint, replaced: dict) -> Plan:
    """The checkpoint's order, rules and block labels (its manifest's), so saving again writes the same file."""
    listed = (read_manifest(ck.path) or {}).get("tensors")  # a folder's, or a single file's sidecar
    recorded = {t.get("name"): t for t in listed if isinstance(t, dict)} if isinstance(listed, list) else {}
    rank = {n: i for i, n in enumerate(recorded)}
    plans = []
    for name in sorted(ck.names, key=lambda n: rank.get(n, len(rank))):
        m = recorded.get(name, {})
        rule = m.get("rule") if isinstance(m.get("rule"), str) else "stored"
        if name in replaced:
            qt = replaced[name].quantized_tensor()
            label = m.get("block_size")
            label = label if label in ("row", "tensor") or (isinstance(label, int) and label > 0) else qt.spec.block_size
            plans.append(TensorPlan(name, tuple(qt.shape), qt.orig_dtype, qt.spec, rule, label))
        else:
            dt, shape = ck.orig_dtype(name), ck.shape(name)
            plans.append(TensorPlan(name, tuple(shape), dt, None, rule))
    return Plan(plans, Recipe())


def _checked(t: torch.Tensor, like: torch.Tensor, name: str, path: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(like.shape):
        raise bad_input(f"{path}: {name} is {list(t.shape)} in the checkpoint but {list(like.shape)} in the model; "
                        "pass a skeleton of the same architecture")
    return t
