"""LoRA on a frozen convolution (a KbitConv or a plain nn.Conv1d/Conv2d), as PEFT does it for convolutions:

    y = base(x) + conv(conv(dropout(x), A), B) * scaling

A is [r, in, *kernel] with the base's stride, padding and dilation (the low-rank "down" convolution); B is
[out, r, 1, ...] (a pointwise "up" convolution), zero-initialised so a fresh adapter changes nothing. Grouped
and depthwise convolutions take no adapter (each output channel sees only its own group: a rank-r update
across groups would change what the layer computes), nor do reflect/replicate/circular padding modes.

Memory: like FrozenKbitMatmul for linear layers, a k-bit base runs under FrozenKbitConv, which keeps nothing
from forward and decodes the weight again in backward for the input's gradient: autograd would otherwise hold
a full-precision copy of every k-bit convolution from forward to backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kbitcli.models.kbit_conv import CONVS, KbitConv

INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input}


def adaptable(module: nn.Module) -> bool:
    """A convolution LoRA can adapt: ungrouped, zero padding."""
    is_conv = isinstance(module, KbitConv) or (isinstance(module, (nn.Conv1d, nn.Conv2d))
                                               and not isinstance(module, nn.modules.conv._ConvTransposeNd))
    return is_conv and module.groups == 1 and module.padding_mode == "zeros"


class FrozenKbitConv(torch.autograd.Function):
    """base(x) with the input's gradient computed from a freshly decoded weight in backward."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base, ctx.shape = base, x.shape
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad_y):
        b = ctx.base
        w = b.dequantize_weight(grad_y.dtype)  # one layer, freed on return
        grad = INPUT_GRAD[len(b.kernel_size)](ctx.shape, w, grad_y, b.stride, b.padding, b.dilation, b.groups)
        return grad, None


class LoraConv(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not adaptable(base):
            raise ValueError(f"LoRA needs an ungrouped, zero-padded convolution, got {base}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kernel = tuple(base.kernel_size)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels, *kernel, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, *(1,) * len(kernel), dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        # 'same' padding has no input-gradient helper: those layers let autograd keep the decoded weight
        if isinstance(b, KbitConv) and torch.is_grad_enabled() and x.requires_grad and not isinstance(b.padding, str):
            y = FrozenKbitConv.apply(x, b)
        else:
            y = b(x)
        conv = CONVS[len(b.kernel_size)]
        h = conv(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A, None, b.stride, b.padding, b.dilation)
        return y + (conv(h, self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base's weight [out, in, *kernel]: B composed with A, times scaling."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        return torch.einsum("or,ri...->oi...", b.flatten(1), a) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}"
