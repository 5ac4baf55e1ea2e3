"""Loading k-bit checkpoints as transformers models (Llama, BERT, GPT-2 Conv1D) and generating from them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kbitcli.api as kbit
from kbitcli.commands.app import app
from kbitcli.errors import KbitError
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.models.generate import generate_text
from kbitcli.hf import name_mapper
from kbitcli.models.load import kbit_modules, load_model, weight_memory
from kbitcli.recipes import Recipe


def encode_to(src: str, dst: str, **settings) -> str:
    kbit.encode(src, dst, Recipe(**settings))
    return dst


@pytest.fixture(scope="module")
def stories_k(stories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stories")
    return {k: encode_to(stories_dir, str(root / f"k{k}"), bits=k, block_size=64, dtype="nf") for k in (4, 8)}


@pytest.fixture(scope="module")
def minilm_k4(minilm_dir, tmp_path_factory):
    return encode_to(minilm_dir, str(tmp_path_factory.mktemp("minilm") / "k4"), bits=4, block_size=64, dtype="nf")


def with_decoded_weights(dense_path: str, kbit_path: str, **kw):
    """The dense model with every quantized weight replaced by its decoded value: what a k-bit model must compute."""
    model, _ = load_model(dense_path, tokenizer=False, **kw)
    ck = KbitCheckpoint(kbit_path)
    params = dict(model.named_parameters())
    to_model = name_mapper(set(params), model.base_model_prefix)
    with torch.no_grad():
        for name in ck.names:
            if ck.is_quantized(name) and to_model(name) is not None:
                p = params[to_model(name)]
                p.copy_(ck.tensor(name, p.dtype))
    return model


def test_llama_kbit_logits_equal_decoded_dense(stories_dir, stories_k):
    model, tok = load_model(stories_k[4])
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert len(kbit_modules(model)) == 35  # 5 layers x (q, k, v, o, gate, up, down)
    ref = with_decoded_weights(stories_dir, stories_k[4])
    ids = tok("Once upon a time there was a big dog", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # tied embeddings stay tied, and the rotary buffers carry real values (not meta placeholders)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_bert_kbit_matches_decoded_dense(minilm_dir, minilm_k4):
    model, tok = kbit.load_model(minilm_k4)
    assert type(model).__name__ == "BertModel" and tok is not None
    mods = kbit_modules(model)
    assert len(mods) == 6 * 6 + 1 and all(m.bias is not None for m in mods.values())  # 6 linears per layer + pooler
    ref = with_decoded_weights(minilm_dir, minilm_k4)
    enc = tok(["A man is playing a guitar.", "Quantization keeps four bits per weight."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).last_hidden_state, ref(**enc).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_bert_prefix_mapping_both_ways(minilm_k4, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    # checkpoint without the `bert.` prefix into a model that wants it: the MLM head is not in the checkpoint
    with pytest.raises(KbitError, match="cls.predictions"):
        load_model(minilm_k4, model_cls="BertForMaskedLM", tokenizer=False)
    # checkpoint with the prefix (a classifier) into the bare BertModel: prefix stripped, head ignored
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "mlm")
    q = encode_to(str(tmp_path / "mlm"), str(tmp_path / "mlm-k8"), bits=8)
    model, _ = load_model(q, model_cls="BertModel")
    assert len(kbit_modules(model)) == 2 * 6 + 1
    assert any(n.startswith("classifier.") for n in model.kbit_info["unexpected"])
    ref = with_decoded_weights(str(tmp_path / "mlm"), q, model_cls="BertModel")
    ids = torch.tensor([[2, 5, 9, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_is_transposed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    q = encode_to(str(tmp_path / "gpt2"), str(tmp_path / "gpt2-k5"), bits=5, block_size=32, dtype="fp")
    model, tok = load_model(q)
    assert tok is None
    mods = kbit_modules(model)
    assert len(mods) == 8 and all(m.transposed for m in mods.values())
    assert (mods["transformer.h.0.attn.c_attn"].in_features, mods["transformer.h.0.attn.c_attn"].out_features) == (48, 144)
    ref = with_decoded_weights(str(tmp_path / "gpt2"), q)
    ids = torch.tensor([[1, 7, 30, 2, 95, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("bits", [4, 8])
def test_resident_weights_are_k_bit(stories_k, bits):
    model, _ = load_model(stories_k[bits])
    mods = kbit_modules(model)
    for m in mods.values():  # no full-precision weight anywhere in a quantized module
        assert [n for n, _ in m.named_parameters()] == []  # Llama linears have no bias
        assert not hasattr(m, "weight")
        assert m.codes.dtype == torch.uint8
    n = sum(m.in_features * m.out_features for m in mods.values())
    bf16_bytes = 2 * n
    kbit_bytes = weight_memory(model)["kbit_module_bytes"]
    expected = (bits + 16 / 64) / 16
    # codes + fp16 scales, plus one shared codebook and byte table per data type
    assert kbit_bytes / bf16_bytes == pytest.approx(expected, rel=0.03)
    assert kbit_bytes >= n * (bits + 16 / 64) / 8


def test_bf16_load(stories_k):
    model, tok = load_model(stories_k[4], dtype="bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_k8_greedy_equals_dense_and_k4_writes_text(stories_dir, stories_k):
    dense, tok = load_model(stories_dir)
    q8, _ = load_model(stories_k[8])
    q4, _ = load_model(stories_k[4])
    prompt = "Once upon a time"
    ref = generate_text(dense, tok, prompt, max_new_tokens=40)
    assert generate_text(q8, tok, prompt, max_new_tokens=40)["token_ids"] == ref["token_ids"]
    out4 = generate_text(q4, tok, prompt, max_new_tokens=40)
    assert out4["new_tokens"] == 40
    words = out4["completion"].split()
    assert len(words) >= 5 and sum(w.strip(".,!?\"'").isalpha() for w in words) >= 0.8 * len(words)


def test_generate_cli_json(stories_k):
    r = CliRunner().invoke(app, ["generate", stories_k[8], "--prompt", "Once upon a time", "-n", "12", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kbit"] and out["quantization"]["bits"] == 8 and out["new_tokens"] == 12
    assert out["text"].startswith("Once upon a time")


def test_generate_cli_bad_inputs(minilm_k4, tmp_path):
    r = CliRunner().invoke(app, ["generate", minilm_k4, "--json"])
    assert r.exit_code == 2 and "cannot generate" in r.stderr
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such file" in r.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    r = CliRunner().invoke(app, ["generate", str(bare)])
    assert r.exit_code == 2 and "not a readable safetensors file" in r.stderr
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(bare / "model.safetensors"))  # readable weights, still no config.json
    r = CliRunner().invoke(app, ["generate", str(bare)])
    assert r.exit_code == 2 and "config.json" in r.stderr


def test_generate_samples_are_calibration_text(stories_dir, tmp_path):
    """`--prompt '' --samples N --temperature 1` writes N model-sampled paragraphs to stdout (the product), a
    file `--calib` reads; the same seed gives the same text, greedy sampling is refused."""
    args = ["generate", stories_dir, "--prompt", "", "--samples", "5", "--temperature", "1", "--seed", "3", "-n", "40"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    paras = [p for p in r.stdout.split("\n\n") if p.strip()]
    assert len(paras) == 5 and len(set(paras)) == 5
    assert r.stdout == CliRunner().invoke(app, args).stdout
    assert "tokens in" in r.stderr and "tokens in" not in r.stdout
    (tmp_path / "self.txt").write_text(r.stdout)
    from kbitcli.calibration.data import Calibration, calibration_windows
    from transformers import AutoTokenizer

    w = calibration_windows(AutoTokenizer.from_pretrained(stories_dir), Calibration(str(tmp_path / "self.txt"), tokens=64), 32)
    assert w.shape == (2, 32)
    r = CliRunner().invoke(app, ["generate", stories_dir, "--samples", "2", "-n", "4"])
    assert r.exit_code == 2 and "--temperature" in r.stderr
    r = CliRunner().invoke(app, ["generate", stories_dir, "--samples", "0", "--temperature", "1"])
    assert r.exit_code == 2 and "--samples" in r.stderr


def test_generate_writes_the_completion_to_stdout(stories_k):
    """The completion is the product: on stdout (for `> out.txt` and pipes), the status line on stderr."""
    r = CliRunner().invoke(app, ["generate", stories_k[8], "--prompt", "Once upon a time", "-n", "12"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Once upon a time") and r.stdout.endswith("\n") and len(r.stdout.split()) > 4
    assert "tokens in" in r.stderr and "Once upon a time" not in r.stderr
