"""KbitEmbedding: a quantized embedding table loads k-bit, looks rows up exactly as dequantize-then-index does, and
a tied lm_head computes from the very same codes (stories260K, and tiny random Llama models for the shapes:
blocks that span rows, rows that span blocks, rows that do not start on a code group, an untied lm_head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kbitcli.api as kbit
from kbitcli.core import matvec
from kbitcli.finetune.lora import select_targets
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.hf import name_mapper
from kbitcli.models.generate import generate_text
from kbitcli.models.kbit_embedding import KbitEmbedding
from kbitcli.models.kbit_linear import KbitLinear
from kbitcli.models.load import load_model, weight_memory
from kbitcli.recipes import Recipe

EMB = "model.embed_tokens.weight"
PROJ = "re:.*(q|k|v|o|gate|up|down)_proj"


def encode_with_embedding(src: str, dst: str, extra=(), **settings) -> str:
    kbit.encode(src, dst, Recipe(targets=[PROJ, "model.embed_tokens", *extra], **settings))
    return dst


def decoded_dense(dense_path: str, kbit_path: str):
    """The dense model with every quantized tensor replaced by its decoded value (a tied lm_head follows its
    embedding): what the k-bit model must compute."""
    model, _ = load_model(dense_path, tokenizer=False)
    ck = KbitCheckpoint(kbit_path)
    params = dict(model.named_parameters())
    to_model = name_mapper(set(params), model.base_model_prefix)
    with torch.no_grad():
        for name in ck.names:
            if ck.is_quantized(name):
                params[to_model(name)].copy_(ck.tensor(name, torch.float32))
    return model


def tiny_llama(path, hidden: int, tie: bool = True, vocab: int = 97) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=hidden // 2, vocab_size=vocab, tie_word_embeddings=tie,
                      max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def stories_emb(stories_dir, tmp_path_factory):
    """stories260K (dim 64, vocab 512, tied) at nf4, block 64, double-quantized scales, embedding included."""
    return encode_with_embedding(stories_dir, str(tmp_path_factory.mktemp("emb") / "nf4"), bits=4, block_size=64,
                                 dtype="nf", double_quant=True)


def test_stories_embedding_loads_k_bit_and_ties_lm_head(stories_dir, stories_emb):
    model, tok = load_model(stories_emb)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, KbitEmbedding) and isinstance(head, KbitLinear)
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())  # no dense table anywhere
    for part in ("codes", "scales", "scales_absmax", "scales_offset"):  # one copy, shared
        assert getattr(head, part).data_ptr() == getattr(emb, part).data_ptr()
    assert model.kbit_info["tied"] == {"lm_head": "model.embed_tokens"}
    # resident: the table is ~4 bits a value, counted once (a dense fp32 table alone would be 128 KB)
    mem = weight_memory(model)
    assert emb.memory_bytes() < 512 * 64 * 4.2 / 8 + 512 and mem["kbit_module_bytes"] > emb.memory_bytes()
    assert mem["total_bytes"] < 0.3 * weight_memory(load_model(stories_dir, tokenizer=False)[0])["total_bytes"]

    table = KbitCheckpoint(stories_emb).tensor(EMB, torch.float32)
    ids = torch.tensor([[0, 5, 511, 5], [300, 1, 2, 64]])
    assert torch.equal(emb(ids), table[ids]) and emb(ids).shape == (2, 4, 64)
    assert torch.equal(emb.dequantize_table(), table)

    ref = decoded_dense(stories_dir, stories_emb)
    ids = tok("Once upon a time there was a big dog", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        # batch 1 decode: the lm_head runs through the fused kernel (or the slab path without one): its exact walk
        # gives the same logits; its integer path (the default, x and the table rounded to int16) ~1e-4 of them
        old = matvec.set_exact(True)
        try:
            torch.testing.assert_close(model(ids[:, :1]).logits, ref(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
        finally:
            matvec.set_exact(old)
        torch.testing.assert_close(model(ids[:, :1]).logits, ref(ids[:, :1]).logits, rtol=1e-3, atol=3e-3)
    got = generate_text(model, tok, "Once upon a time", max_new_tokens=16)
    want = generate_text(ref, tok, "Once upon a time", max_new_tokens=16)
    assert got["new_tokens"] == 16 and got["token_ids"] == want["token_ids"]


def test_bf16_load_returns_bf16_rows(stories_emb):
    model, _ = load_model(stories_emb, dtype="bf16", tokenizer=False)
    table = KbitCheckpoint(stories_emb).tensor(EMB, torch.bfloat16)
    ids = torch.arange(0, 512, 7)
    assert torch.equal(model.model.embed_tokens(ids), table[ids])
    with torch.no_grad():
        assert model(ids[None, :8]).logits.dtype == torch.bfloat16


def test_out_of_range_ids_are_refused(stories_emb):
    emb = load_model(stories_emb, tokenizer=False)[0].model.embed_tokens
    for bad in ([512], [-1]):
        with pytest.raises(IndexError, match="out of range"):
            emb(torch.tensor(bad))
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 64)


def test_lora_leaves_embedding_and_tied_head_alone(stories_emb):
    """finetune's default targets are the k-bit linears the checkpoint stores: not the table, not the tied head."""
    model = load_model(stories_emb, tokenizer=False)[0]
    names = select_targets(model, None)
    assert len(names) == 35 and not any("embed" in n or "lm_head" in n for n in names)


@pytest.mark.parametrize("hidden,block,bits,dq", [
    (48, 64, 3, False),   # blocks end mid-row (48 vs 64): each value looks its block up
    (64, 128, 5, True),   # two rows per block
    (36, 64, 4, False),   # 36 codes per row: rows do not start on a code group (row-by-row path)
    (64, 32, 2, False),   # two blocks per row, k = 2
])
def test_shapes_match_dequantize_then_index(tmp_path, hidden, block, bits, dq):
    src = tiny_llama(tmp_path / "dense", hidden)
    dst = encode_with_embedding(src, str(tmp_path / "k"), bits=bits, block_size=block, dtype="nf", double_quant=dq)
    model = load_model(dst, tokenizer=False)[0]
    emb = model.model.embed_tokens
    assert isinstance(emb, KbitEmbedding) and model.lm_head.codes.data_ptr() == emb.codes.data_ptr()
    table = KbitCheckpoint(dst).tensor(EMB, torch.float32)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(emb(ids), table[ids])
    ref = decoded_dense(src, dst)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:1, :1]).logits, ref(ids[:1, :1]).logits, rtol=1e-4, atol=1e-4)


def test_untied_lm_head_is_its_own_kbit_linear(tmp_path):
    src = tiny_llama(tmp_path / "dense", 64, tie=False)
    dst = encode_with_embedding(src, str(tmp_path / "k"), extra=["lm_head"], bits=4, block_size=64, dtype="nf")
    model = load_model(dst, tokenizer=False)[0]
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, KbitEmbedding) and isinstance(head, KbitLinear)
    assert head.codes.data_ptr() != emb.codes.data_ptr() and model.kbit_info["tied"] == {}
    ref = decoded_dense(src, dst)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
