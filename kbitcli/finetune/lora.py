"""LoRA on top of any frozen linear-like module: y = base(x) + dropout(x) @ A.T @ B.T * scaling.

The base is whatever the model already has (a KbitLinear holding packed k-bit codes, or a plain nn.Linear)
and is never modified; A (r, in) and B (out, r) are fp32 parameters, initialised as PEFT does (A
kaiming-uniform with a = sqrt(5), B zeros, so a fresh adapter changes nothing).

Memory: autograd would keep the dequantized weight of every k-bit layer alive from forward to backward
(F.linear saves its weight to compute the input's gradient): a full-precision copy of the whole base, which
is exactly what QLoRA-style training must avoid. So a k-bit base runs under `FrozenKbitMatmul`, which saves
nothing in forward and dequantizes the weight again, one layer at a time, in backward (as bitsandbytes'
MatMul4Bit does). The base gets no gradient of its own; only the input's gradient flows through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import bad_input
from kbitcli.finetune.lora_conv import LoraConv, adaptable
from kbitcli.models.kbit_conv import KbitConv
from kbitcli.models.kbit_linear import KbitLinear
from kbitcli.recipes import matches


def is_kbit(module: nn.Module) -> bool:
    return isinstance(module, KbitLinear)  # not KbitConv: a LoRA here is a linear adapter


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_kbit(module)


class FrozenKbitMatmul(torch.autograd.Function):
    """base(x) with the input's gradient grad_y @ W computed from a freshly dequantized W in backward."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.base.dequantize_weight(grad_y.dtype)  # [out, in], one layer, freed on return
        return grad_y @ w, None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_kbit(self.base) and torch.is_grad_enabled() and x.requires_grad:
            y = FrozenKbitMatmul.apply(x, self.base)
        else:
            y = self.base(x)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: what merging adds to the base's [out, in] weight."""
        return (self.lora_B.detach() @ self.lora_A.detach()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules (and ungrouped convolutions, lora_conv.py) whose weight the checkpoint stores under
    their own name (a tied lm_head is not one)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=True)} | {n for n, _ in model.named_buffers()}
    out = {}
    for name, m in model.named_modules():
        if (is_kbit(m) or isinstance(m, KbitConv) and adaptable(m)) and f"{name}.codes" in params:
            out[name] = m
        elif (isinstance(m, nn.Linear) or adaptable(m)) and f"{name}.weight" in params:
            out[name] = m
    return out


def select_targets(model: nn.Module, patterns: tuple[str, ...] | list[str] | None, where: str = "--targets") -> list[str]:
    """Module names to adapt: every k-bit linear (and ungrouped k-bit convolution) by default, else the
    linear-like modules and convolutions the patterns match.
    Every pattern must match at least one module, so a typo is an error, not a silently smaller adapter."""
    cands = candidate_modules(model)
    if patterns is None:
        names = [n for n, m in cands.items() if is_kbit(m) or isinstance(m, KbitConv)]
        if not names:
            raise bad_input("the model has no k-bit linear layers to adapt; encode it with `kbit encode` first "
                            "or name modules with --targets")
        return names
    chosen = set()
    for p in patterns:
        hit = [n for n in cands if matches(p, n)]
        if not hit:
            example = next(iter(cands), "model.layers.0.self_attn.q_proj")
            raise bad_input(f"{where}: pattern {p!r} matches no linear layer or ungrouped convolution (e.g. {example!r}); "
                            "run `kbit inspect MODEL` to list the names")
        chosen.update(hit)
    return [n for n in cands if n in chosen]


def attach_lora(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float = 0.0,
                rslora: bool = False, seed: int = 0) -> dict[str, LoraLinear]:
    """Freeze the whole model, then replace each named module by a LoraLinear (a LoraConv for a convolution)
    around it, in place. A's initialisation is drawn from a generator seeded with `seed`, in module order: same seed, same adapter."""
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    loras = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        lora = (LoraConv if adaptable(base) else LoraLinear)(base, rank, alpha, dropout, rslora, gen)
        device = next(iter(base.buffers()), None)
        if device is None:
            device = next(base.parameters())
        lora.to(device.device)
        setattr(parent, child, lora)
        loras[name] = lora
    return loras


def lora_parameters(loras: dict[str, LoraLinear]) -> list[nn.Parameter]:
    return [p for lo in loras.values() for p in (lo.lora_A, lo.lora_B)]
