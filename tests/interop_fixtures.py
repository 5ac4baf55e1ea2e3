"""Shared by tests/test_interop_*.py: a tiny random Llama with 128-multiple shapes (shape coverage only: GGUF rows
of 32, bitsandbytes' CPU kernel wants out_features % 32 == 0, compressed-tensors groups of 128), and helpers."""

from __future__ import annotations

import os
import shutil

import torch

from kbitcli.paths import STORIES260K

IDS = torch.tensor([[1, 403, 407, 261, 378, 29, 306, 263, 260, 500, 33, 89, 120, 411, 263, 1]])


def make_tiny_llama(folder: str, tie: bool = False) -> str:
    """hidden 128, FFN 256, 2 layers, 4 heads / 2 KV heads (head_dim 32), vocab 512 with stories260K's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(os.path.join(STORIES260K, f), folder)
    return folder


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def bnb_generic_path(model):
    """bitsandbytes' CPU AVX512-BF16 kernel computes in bf16 and needs out_features % 32 == 0; its generic path
    dequantizes (fp32) and runs F.linear. Switch every Linear4bit to the generic path."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model
