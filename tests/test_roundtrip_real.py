"""Real round trips: stories260K and all-MiniLM-L6-v2 go encode -> decode -> transformers `from_pretrained`,
load like the originals (same names, shapes, dtypes) and compute nearly the same outputs; the manifest
verifies the files and catches a flipped byte.

Tolerances come from measurement (torch 2.13 CPU): stories260K at nf4/B64 (the defaults) loses 0.10
nats/token on 20 TinyStories stories (1.1924 -> 1.2952), logits cosine 0.9963 on average, top-1 token agrees at
86% of positions; int8 (recipes/int8.yaml) loses 0.0008 (1.1932), logits cosine 0.99998. MiniLM with
recipes/bert-nf4.yaml: weights at 21.02 dB SQNR (bitsandbytes NF4 + double quant: 20.54 dB, same bits), and
mean-pooled sentence embeddings keep a cosine of 0.972 on average (0.965 at worst) over 64 lines of text.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from kbit_cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode_decode(src: str, tmp_path, *args: str) -> tuple[str, str]:
    q, d = str(tmp_path / "q"), str(tmp_path / "d")
    r = cli("encode", src, q, "--quiet", *args)
    assert r.code == 0, r.stderr
    r = cli("decode", q, d, "--quiet")
    assert r.code == 0, r.stderr
    return q, d


def same_layout(a: str, b: str) -> dict[str, torch.Tensor]:
    sa, sb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert list(sa) == list(sb) or sorted(sa) == sorted(sb)
    for n in sa:
        assert sa[n].shape == sb[n].shape and sa[n].dtype == sb[n].dtype, n
    return sa, sb


# --- stories260K: a real Llama ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_texts(tinystories_text) -> list[str]:
    text = open(tinystories_text).read()
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:20]


def causal_outputs(path: str, texts: list[str]) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    total = count = 0
    logits = []
    with torch.no_grad():
        for s in texts:
            ids = torch.tensor([[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]])[:, :512]
            out = model(ids, labels=ids)
            total += out.loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
            logits.append(out.logits[0])
    return total / count, torch.cat(logits)


@pytest.fixture(scope="module")
def stories_reference(stories_dir, stories_texts):
    return causal_outputs(stories_dir, stories_texts)


def test_stories_nf4_round_trip(stories_dir, stories_texts, stories_reference, tmp_path):
    q, d = encode_decode(stories_dir, tmp_path)
    orig, dec = same_layout(stories_dir, d)
    # tensors that were not quantized come back bit for bit
    for n in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.2.input_layernorm.weight"):
        assert torch.equal(orig[n], dec[n])
    assert not torch.equal(orig["model.layers.2.mlp.up_proj.weight"], dec["model.layers.2.mlp.up_proj.weight"])
    loss0, logits0 = stories_reference
    loss, logits = causal_outputs(d, stories_texts)
    cos = torch.nn.functional.cosine_similarity(logits0, logits, dim=-1)
    agree = (logits0.argmax(-1) == logits.argmax(-1)).float().mean().item()
    assert 0 < loss - loss0 < 0.2 and cos.mean() > 0.99 and agree > 0.8, (loss0, loss, cos.mean(), agree)
    # the decoded folder is a complete model folder: the tokenizer came along, the config is the original's
    assert json.load(open(os.path.join(d, "config.json"))).get("quantization_config") is None


def test_stories_int8_is_nearly_lossless(stories_dir, stories_texts, stories_reference, tmp_path):
    _, d = encode_decode(stories_dir, tmp_path, "--recipe", os.path.join(ROOT, "recipes", "int8.yaml"))
    loss0, logits0 = stories_reference
    loss, logits = causal_outputs(d, stories_texts)
    assert abs(loss - loss0) < 0.01
    assert torch.nn.functional.cosine_similarity(logits0, logits, dim=-1).mean() > 0.9999


def test_verify_passes_then_fails_after_a_flipped_byte(stories_dir, tmp_path):
    q = str(tmp_path / "q")
    assert cli("encode", stories_dir, q, "--quiet", "--max-shard-size", "150KB").code == 0
    ok = cli("inspect", q, "--verify", "--json")
    assert ok.code == 0 and json.loads(ok.stdout)["verify"] == {"ok": True, "files": len(os.listdir(q)) - 1}
    shard = os.path.join(q, "model-00002-of-00002.safetensors")
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0x01
    open(shard, "wb").write(bytes(blob))
    bad = cli("inspect", q, "--verify")
    assert bad.code == 1 and bad.stdout == ""
    assert "model-00002-of-00002.safetensors" in bad.stderr and "sha256" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # restored, it verifies again; a changed side file (the tokenizer) is caught too
    blob[len(blob) // 2] ^= 0x01
    open(shard, "wb").write(bytes(blob))
    assert cli("inspect", q, "--verify", "--quiet").code == 0
    with open(os.path.join(q, "tokenizer_config.json"), "a") as fh:
        fh.write(" ")
    bad = cli("inspect", q, "--verify")
    assert bad.code == 1 and "tokenizer_config.json" in bad.stderr


# --- all-MiniLM-L6-v2: a real BERT encoder ---------------------------------------------------------------


def pooled_embeddings(path: str, lines: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    x = tok(lines, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**x).last_hidden_state
    mask = x["attention_mask"][..., None]
    return (h * mask).sum(1) / mask.sum(1)


def test_minilm_bert_nf4_round_trip(minilm_dir, tinystories_text, tmp_path):
    import bitsandbytes.functional as F

    q, d = encode_decode(minilm_dir, tmp_path, "--recipe", os.path.join(ROOT, "recipes", "bert-nf4.yaml"))
    orig, dec = same_layout(minilm_dir, d)
    info = json.loads(cli("inspect", q, "--verify", "--json").stdout)
    assert info["quantized_tensors"] == 37 and info["verify"]["ok"]
    assert info["bits_per_param_quantized"] == pytest.approx(4.127, abs=1e-3)
    # weight error of the checkpoint as written: at least as good as bitsandbytes NF4 + double quant (same bits)
    names = [r["name"] for r in info["plan"] if r["quantized"]]
    signal = sum(orig[n].double().pow(2).sum().item() for n in names)
    ours = sum((orig[n].double() - dec[n].double()).pow(2).sum().item() for n in names)
    bnb = 0.0
    for n in names:
        packed, state = F.quantize_4bit(orig[n], blocksize=64, quant_type="nf4", compress_statistics=True)
        bnb += (orig[n].double() - F.dequantize_4bit(packed, state).double()).pow(2).sum().item()
    sqnr, sqnr_bnb = 10 * math.log10(signal / ours), 10 * math.log10(signal / bnb)
    assert sqnr >= sqnr_bnb, (sqnr, sqnr_bnb)
    # the model: loads with transformers from the decoded folder, embeds sentences nearly as before
    text = open(tinystories_text).read().replace("<|endoftext|>", "\n")
    lines = [s.strip() for s in text.split("\n") if len(s.strip()) > 40][:64]
    e0, e1 = pooled_embeddings(minilm_dir, lines), pooled_embeddings(d, lines)
    cos = torch.nn.functional.cosine_similarity(e0, e1)
    assert cos.mean() > 0.95 and cos.min() > 0.9, (cos.mean(), cos.min())
