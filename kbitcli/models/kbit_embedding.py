"""KbitEmbedding: an embedding table that stays k-bit in memory; a lookup decodes only the rows it returns.

It holds exactly what the checkpoint stores for the table (packed codes, per-block scales, the double-quant
constants, the codebook), as KbitLinear does for a weight, and no full-precision copy. Blocks are cut from the
flattened [num_embeddings, embedding_dim] table, so a block may end mid-row or span rows; a lookup gathers the
packed bytes of the requested rows, decodes them with the core's own decoder (`blockwise.code_values`, the one
`dequantize` uses) and multiplies each value by its block's scale. The result equals dequantize-then-index bit
for bit.

A tied output layer (lm_head sharing the embedding, `tie_word_embeddings`) becomes a KbitLinear over the very
same code and scale tensors (`tied_linear`): one copy in memory, and at batch 1 the fused kernel
(core/matvec.py) serves the vocabulary projection, the largest single matrix of a small language model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.core.blockwise import DQ_BLOCK, QuantizedTensor, Spec, code_values, dequantize, dequantize_range
from kbitcli.models.kbit_linear import DERIVED, KbitLinear, _scale_table

SHARED_PARTS = ("codes", "scales", "codebook", "scales_absmax", "scales_offset")  # what a tied lm_head shares


class KbitEmbedding(nn.Module):
    def __init__(self, spec: Spec, shape: tuple[int, int], orig_dtype: torch.dtype, codes: torch.Tensor,
                 scales: torch.Tensor, codebook: torch.Tensor, scales_absmax: torch.Tensor | None = None,
                 scales_offset: torch.Tensor | None = None, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"KbitEmbedding needs a 2-D table, got shape {tuple(shape)}")
        self.spec = spec
        self.shape = tuple(int(s) for s in shape)
        self.num_embeddings, self.embedding_dim = self.shape
        self.orig_dtype = orig_dtype
        self.output_dtype = dtype or orig_dtype  # what a lookup returns (nn.Embedding: its weight's dtype)
        self.padding_idx = padding_idx  # kept for code that reads it; the table is frozen, so it changes nothing
        self.register_buffer("codes", codes.reshape(-1).to(torch.uint8))
        self.register_buffer("scales", scales.reshape(-1))
        self.register_buffer("codebook", codebook.float())
        self.register_buffer("scales_absmax", None if scales_absmax is None else scales_absmax.float())
        self.register_buffer("scales_offset", None if scales_offset is None else scales_offset.float())

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, padding_idx: int | None = None,
                       dtype: torch.dtype | None = None) -> "KbitEmbedding":
        return cls(qt.spec, qt.shape, qt.orig_dtype, qt.codes, qt.scales, qt.codebook, qt.scales_absmax,
                   qt.scales_offset, padding_idx, dtype)

    def quantized_tensor(self) -> QuantizedTensor:
        """The table as a QuantizedTensor view of this module's buffers (no copy)."""
        return QuantizedTensor(self.spec, self.shape, self.orig_dtype, self.codes, self.scales, self.codebook,
                               self.scales_absmax, self.scales_offset)

    def __getstate__(self):
        # caches derived from the buffers (the kernel's ctypes view, slab plans, decoders) are rebuilt on use;
        # dropping them lets copy.deepcopy and pickling copy the module
        return {k: v for k, v in self.__dict__.items() if k not in DERIVED}

    def tied_linear(self, bias: torch.Tensor | None = None) -> KbitLinear:
        """A KbitLinear computing x @ table^T (a tied lm_head) over this module's own tensors: no copy."""
        return KbitLinear.from_quantized(self.quantized_tensor(), bias)

    def dequantize_table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table, dense (a fresh tensor; for tests, export and debugging)."""
        return dequantize(self.quantized_tensor(), dtype)

    # ---- lookup -----------------------------------------------------------------------------------------
    def _scales_at(self, blocks: torch.Tensor) -> torch.Tensor:
        """fp32 scales of the given block indices (any shape); double quant decoded for just those blocks,
        with the same two roundings as blockwise.dequantize_scales."""
        if self.scales_absmax is None:
            return self.scales[blocks].float()
        table = _scale_table(self.scales.device)
        return table[self.scales[blocks].long()] * self.scales_absmax[blocks // DQ_BLOCK] + self.scales_offset

    def _decoder(self):
        """The core's decoder for this codebook (cached here: finding it by the codebook's bytes costs more than
        a one-row lookup)."""
        key = self._buffers["codebook"].data_ptr()
        cached = self.__dict__.get("_values")
        if cached is None or cached[0] != key:
            # codes are checked once when a module is loaded from a file (blockwise.check_codes), not per lookup
            self.__dict__["_values"] = cached = (key, code_values(self.codebook, self.spec.bits, check=False))
        return cached[1]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` (1-D int64) of the table: [len(ids), embedding_dim]."""
        n, dim, k, B = ids.numel(), self.embedding_dim, self.spec.bits, self.spec.block_size
        if dim % 8:  # a row does not start on a whole code group: decode row by row through the core
            qt = self.quantized_tensor()
            scales = qt.effective_scales()
            out = torch.empty(n, dim)
            for i, r in enumerate(ids.tolist()):
                out[i] = dequantize_range(qt, r * dim, (r + 1) * dim, scales)
            return out
        # every row is dim * k / 8 whole bytes starting on a code-group boundary: one gather of their bytes
        # is itself a valid packed stream of n * dim codes
        packed = self.codes.view(self.num_embeddings, dim * k // 8).index_select(0, ids)
        values = self._decoder()(packed.view(-1), n * dim, torch.empty(n * dim)).view(n, dim)
        if dim % B == 0:  # whole blocks per row
            per = dim // B
            blocks = ids[:, None] * per + torch.arange(per, device=ids.device)
            values.view(n, per, B).mul_(self._scales_at(blocks)[:, :, None])
        elif B % dim == 0:  # whole rows per block
            values.mul_(self._scales_at(ids * dim // B)[:, None])
        else:  # ragged: blocks end mid-row, so each value looks its block up
            values.mul_(self._scales_at((ids[:, None] * dim + torch.arange(dim, device=ids.device)) // B))
        return values

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(device=self.codes.device, dtype=torch.int64)
        lo, hi = flat.aminmax() if flat.numel() else (0, 0)
        if int(lo) < 0 or int(hi) >= self.num_embeddings:
            raise IndexError(f"index out of range in self (ids must be in [0, {self.num_embeddings}))")
        return self.rows(flat).to(self.output_dtype).view(*ids.shape, self.embedding_dim)

    # ---- accounting -------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.num_embeddings}, {self.embedding_dim}, k={s.bits}, block={s.block_size}, dtype={s.dtype}"
                f"{'+dq' if s.double_quant else ''}" + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


class KbitEmbeddingBag(KbitEmbedding):
    """nn.EmbeddingBag over a k-bit table (recommendation models: one bag of ids per sparse feature). The rows
    the batch looks up are decoded (`rows`), then torch's own embedding_bag reduces the bags over them, so every
    mode, offsets layout, per_sample_weights and padding_idx means what it means there."""

    def __init__(self, *args, mode: str = "mean", include_last_offset: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode, self.include_last_offset = mode, include_last_offset

    @classmethod
    def from_bag(cls, qt: QuantizedTensor, bag: nn.EmbeddingBag) -> "KbitEmbeddingBag":
        if bag.max_norm is not None:  # renorming rewrites the table on lookup: a frozen k-bit table cannot
            raise ValueError("an EmbeddingBag with max_norm has no k-bit form")
        return cls(qt.spec, qt.shape, qt.orig_dtype, qt.codes, qt.scales, qt.codebook, qt.scales_absmax,
                   qt.scales_offset, bag.padding_idx, bag.weight.dtype, mode=bag.mode,
                   include_last_offset=bag.include_last_offset)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = ids.reshape(-1).to(device=self.codes.device, dtype=torch.int64)
        lo, hi = flat.aminmax() if flat.numel() else (0, 0)
        if int(lo) < 0 or int(hi) >= self.num_embeddings:
            raise IndexError(f"index out of range in self (ids must be in [0, {self.num_embeddings}))")
        # each position's row, decoded in order (de-duplicating with torch.unique measured slower unless most
        # ids repeat); a padding id points at one extra zero row that embedding_bag leaves out of its bag
        n = flat.numel()
        table = self.rows(flat).to(self.output_dtype)
        local = torch.arange(n, device=flat.device)
        pad = None
        if self.padding_idx is not None:
            pad = n
            table = torch.cat([table, table.new_zeros(1, self.embedding_dim)])
            local = torch.where(flat == self.padding_idx, pad, local)
        return F.embedding_bag(local.view(ids.shape), table, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights, include_last_offset=self.include_last_offset,
                               padding_idx=pad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


def tie_output(linear: KbitLinear, embedding: KbitEmbedding) -> None:
    """Point a tied KbitLinear at the embedding's tensors again (after `.to(device)`, which copies each module's
    buffers apart)."""
    for name in SHARED_PARTS:
        setattr(linear, name, getattr(embedding, name))
