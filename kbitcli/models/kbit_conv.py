"""KbitConv: a 1-D or 2-D convolution whose weight stays k-bit in memory (depthwise and grouped ones too).

It holds what the checkpoint stores for the weight (packed codes, per-block scales, double-quant constants,
the codebook) and no full-precision copy. The blocks are cut from the weight flattened as stored,
[out, in/groups · kh · kw] (docs/FORMAT.md: every tensor is quantized as its flat row-major values), so a
file-level `kbit encode` of a conv weight and this module hold the same bytes.

A convolution reads every weight once per position of its output, so unlike a batch-1 linear layer there is
no gain in multiplying from the codes: forward decodes the whole weight (a depthwise 3x3 layer is a few KB;
MobileNetV2's largest is 1.6 MB in fp32), runs torch's own convolution and drops the weight. Decoding reuses
KbitLinear's slab decoder over the same buffers, viewed as the [out, in/groups · kh · kw] matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.core.blockwise import QuantizedTensor, Spec
from kbitcli.models.kbit_linear import DERIVED, KbitLinear

CONVS = {1: F.conv1d, 2: F.conv2d}  # spatial dims -> torch's convolution


class KbitConv(nn.Module):
    def __init__(self, spec: Spec, shape: tuple[int, ...], orig_dtype: torch.dtype, codes: torch.Tensor,
                 scales: torch.Tensor, codebook: torch.Tensor, scales_absmax: torch.Tensor | None = None,
                 scales_offset: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        if len(shape) - 2 not in CONVS:
            raise ValueError(f"KbitConv needs a 3-D (Conv1d) or 4-D (Conv2d) weight, got shape {tuple(shape)}")
        self.spec = spec
        self.shape = tuple(int(s) for s in shape)  # [out, in/groups, *kernel]
        self.orig_dtype = orig_dtype
        self.out_channels, self.in_channels = self.shape[0], self.shape[1] * groups
        self.kernel_size = self.shape[2:]
        nd = len(self.kernel_size)
        self.stride, self.dilation = _tuple(stride, nd), _tuple(dilation, nd)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, nd)
        self.groups, self.padding_mode = groups, padding_mode
        self.register_buffer("codes", codes.reshape(-1).to(torch.uint8))
        self.register_buffer("scales", scales.reshape(-1))
        self.register_buffer("codebook", codebook.float())
        self.register_buffer("scales_absmax", None if scales_absmax is None else scales_absmax.float())
        self.register_buffer("scales_offset", None if scales_offset is None else scales_offset.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, conv: nn.Module) -> "KbitConv":
        """The k-bit twin of `conv` (an nn.Conv1d / nn.Conv2d): its hyperparameters and bias, qt's weight."""
        if tuple(qt.shape) != tuple(conv.weight.shape):
            raise ValueError(f"weight shape {tuple(qt.shape)} does not fit {conv} ({tuple(conv.weight.shape)})")
        return cls(qt.spec, qt.shape, qt.orig_dtype, qt.codes, qt.scales, qt.codebook, qt.scales_absmax,
                   qt.scales_offset, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   groups=conv.groups, padding_mode=conv.padding_mode)

    def quantized_tensor(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor view of this module's buffers (no copy)."""
        return QuantizedTensor(self.spec, self.shape, self.orig_dtype, self.codes, self.scales, self.codebook,
                               self.scales_absmax, self.scales_offset)

    def __getstate__(self):
        # caches derived from the buffers (the kernel's ctypes view, slab plans, decoders) are rebuilt on use;
        # dropping them lets copy.deepcopy and pickling copy the module
        return {k: v for k, v in self.__dict__.items() if k not in DERIVED}

    def _matrix(self) -> KbitLinear:
        """KbitLinear's decoder over this module's own buffers as the flat [out, rest] matrix (not a
        submodule, so nothing is stored twice; rebuilt when a buffer was replaced, e.g. by .to())."""
        b = self._buffers
        key = (b["codes"].data_ptr(), b["scales"].data_ptr(), b["codebook"].data_ptr())
        cached = self.__dict__.get("_flat")
        if cached is None or cached[0] != key:
            qt = self.quantized_tensor()
            qt.shape = (self.shape[0], math.prod(self.shape[1:]))
            self.__dict__["_flat"] = cached = (key, KbitLinear.from_quantized(qt))
        return cached[1]

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight, [out, in/groups, *kernel], in `dtype` (a fresh tensor)."""
        return self._matrix().dequantize_weight(dtype).view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        conv = CONVS[len(self.kernel_size)]
        if self.padding_mode != "zeros":  # as nn.Conv does: pad first, then a convolution without padding
            pad = [p for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)) for p in _same(k, d)] \
                if self.padding == "same" else [p for p in reversed(self.padding) for _ in range(2)]
            x = F.pad(x, pad, mode=self.padding_mode)
            return conv(x, w, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, k={s.bits}, "
                f"block={s.block_size}, dtype={s.dtype}{'+dq' if s.double_quant else ''}")


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _same(kernel: int, dilation: int) -> tuple[int, int]:
    """(left, right) padding of one dimension for padding='same' (torch puts the odd one on the right)."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2
