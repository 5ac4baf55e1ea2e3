"""transformers' own `from_pretrained` loads a kbit folder once kbit is registered: the same KbitLinear /
KbitEmbedding modules and the same logits as kbit's load_model, no "skip the quantization" warning, nothing
reported missing or initialised at random; unregistered, transformers does exactly that (what a user without
kbit gets, docs/INTEROP.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from torch import nn

from kbitcli.encode import encode
from kbitcli.models.hf_quantizer import register_with_transformers
from kbitcli.models.kbit_embedding import KbitEmbedding
from kbitcli.models.kbit_linear import KbitLinear
from kbitcli.models.load import load_model
from kbitcli.recipes import Override, Recipe

PROJ = "re:.*(q|k|v|o|gate|up|down)_proj"
# what the writer could put in config.json so that transformers without kbit stops instead of random-initialising
MARKER = "kbit checkpoint: transformers reads it only with kbit (kbitcli.api.register_with_transformers())"


@pytest.fixture(scope="module")
def stories_nf4(stories_dir, tmp_path_factory) -> str:
    dst = str(tmp_path_factory.mktemp("hfq") / "nf4")
    encode(stories_dir, dst, Recipe())
    return dst


@pytest.fixture(scope="module")
def stories_emb8(stories_dir, tmp_path_factory) -> str:
    """nf4 projections and an 8-bit embedding table (tied to lm_head in stories260K)."""
    dst = str(tmp_path_factory.mktemp("hfq") / "emb8")
    encode(stories_dir, dst, Recipe(targets=[PROJ, "model.embed_tokens"],
                                    overrides=[Override("model.embed_tokens", {"bits": 8})]))
    return dst


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def hf_load(path: str):
    """(model, loading info, transformers' log lines) of AutoModelForCausalLM.from_pretrained(path)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    handler = Captured()
    hf_logging.add_handler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.remove_handler(handler)
    return model, info, handler.lines


def same_logits(model, ref, ids):
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:, :1]).logits, ref(ids[:, :1]).logits, rtol=1e-5, atol=1e-5)


def test_unregistered_transformers_skips_kbit_and_random_inits(stories_nf4, monkeypatch):
    """The behaviour docs/INTEROP.md describes for a user without kbit: a warning and random projections."""
    from transformers.quantizers import auto

    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "kbit", raising=False)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "kbit", raising=False)
    model, info, lines = hf_load(stories_nf4)
    assert any("skip the quantization" in line for line in lines)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]


def test_from_pretrained_builds_the_kbit_model(stories_nf4):
    assert register_with_transformers() is register_with_transformers()  # once; a second call is a no-op
    model, info, lines = hf_load(stories_nf4)
    ref, tok = load_model(stories_nf4)
    assert not any("skip the quantization" in line for line in lines), lines
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    got = {n for n, m in model.named_modules() if isinstance(m, KbitLinear)}
    want = {n for n, m in ref.named_modules() if isinstance(m, KbitLinear)}
    assert len(got) == 5 * 7 and got == want
    assert not any(type(m) is nn.Linear and m is not model.lm_head for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # dense, tied as the config says
    assert model.config.quantization_config.to_dict()["quant_method"] == "kbit" and model.is_quantized
    q, r = model.model.layers[2].mlp.down_proj, ref.model.layers[2].mlp.down_proj
    assert torch.equal(q.codes, r.codes) and torch.equal(q.dequantize_weight(), r.dequantize_weight())
    ids = tok("Once upon a time there was a big dog", return_tensors="pt").input_ids
    same_logits(model, ref, ids)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    want_ids = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 12 and torch.equal(out, want_ids)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(str(stories_nf4) + "-resaved")


def test_quantized_embedding_and_tied_head(stories_emb8):
    register_with_transformers()
    model, info, _ = hf_load(stories_emb8)
    ref, tok = load_model(stories_emb8)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, KbitEmbedding) and emb.spec.bits == 8 and isinstance(head, KbitLinear)
    assert head.codes.data_ptr() == emb.codes.data_ptr()  # the tied head reads the table's own codes
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.kbit_info["tied"] == {"lm_head": "model.embed_tokens"}
    same_logits(model, ref, tok("The little cat sat on the mat", return_tensors="pt").input_ids)


def test_a_marker_in_config_makes_transformers_without_kbit_fail_loudly(stories_nf4, tmp_path, monkeypatch):
    """config.json `transformers_weights` that is no file name: transformers without kbit raises quoting it; kbit's
    quantizer clears it and loads the usual weights; kbit's own loader ignores it."""
    from transformers.quantizers import auto

    marked = str(tmp_path / "marked")
    shutil.copytree(stories_nf4, marked)
    cfg_path = os.path.join(marked, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    with open(cfg_path, "w") as fh:
        json.dump({**cfg, "transformers_weights": MARKER}, fh)
    ref, tok = load_model(marked)
    register_with_transformers()
    model, info, _ = hf_load(marked)
    assert isinstance(model.model.layers[0].self_attn.q_proj, KbitLinear) and not info["missing_keys"]
    same_logits(model, ref, tok("One day a girl", return_tensors="pt").input_ids)

    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "kbit")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "kbit")
    with pytest.raises(ValueError, match="register_with_transformers"):
        hf_load(marked)


@pytest.mark.parametrize("arch", ["gpt2", "llama-untied"])
def test_tiny_models_conv1d_and_untied_head(arch, tmp_path):
    """GPT-2's Conv1D becomes a transposed KbitLinear (and its _init_weights, which reaches into c_proj from the
    parent module, must not trip over the held-out weight); an untied lm_head and the table are each their own."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src, dst = str(tmp_path / "dense"), str(tmp_path / "k")
    if arch == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                                   eos_token_id=0)).save_pretrained(src)
        encode(src, dst, Recipe())
    else:
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=32, vocab_size=97, tie_word_embeddings=False,
                                     max_position_embeddings=64)).save_pretrained(src)
        encode(src, dst, Recipe(targets=[PROJ, "model.embed_tokens", "lm_head"]))
    register_with_transformers()
    model, info, _ = hf_load(dst)
    ref, _ = load_model(dst, tokenizer=False)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = {n: (type(m).__name__, getattr(m, "transposed", None)) for n, m in model.named_modules()
           if isinstance(m, (KbitLinear, KbitEmbedding))}
    assert got == {n: (type(m).__name__, getattr(m, "transposed", None)) for n, m in ref.named_modules()
                   if isinstance(m, (KbitLinear, KbitEmbedding))}
    assert len(got) == (2 * 4 if arch == "gpt2" else 7 + 2)
    if arch == "gpt2":
        assert model.transformer.h[0].attn.c_attn.transposed
    else:
        assert model.lm_head.codes.data_ptr() != model.model.embed_tokens.codes.data_ptr()
    same_logits(model, ref, torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]))
