"""--format gguf for a BERT encoder (the real all-MiniLM-L6-v2, formats/gguf_bert.py): the file holds what llama.cpp's
convert_hf_to_gguf.py writes for BERT (bert.* hyperparameters, pooling, llama.cpp's tensor names, the WordPiece
vocabulary in its phantom-space form), kbit's GGUF reader gives back the same weights the gguf package dequantizes,
under transformers' names, and a BertModel built from the decode embeds text like the original; a BERT without a
tokenizer or with a pooling llama.cpp does not do is refused before anything is written."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch

from kbitcli.decode import decode
from kbitcli.encode import encode
from kbitcli.formats.registry import open_reader
from kbitcli.paths import ASSETS
from kbitcli.recipes import Recipe
from kbit_cli import assert_bad_input, cli

gguf = pytest.importorskip("gguf")
TEXTS = sorted(glob.glob(os.path.join(ASSETS, "text", "*.txt")))
LAYER_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
               "layer_output_norm")
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def files(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert")
    made = {}
    for qtype in ("Q8_0", "Q4_0"):
        dst = str(out / f"minilm-{qtype}.gguf")
        made[qtype] = (dst, encode(minilm_dir, dst, Recipe(bits=int(qtype[1]), block_size=32, dtype="int",
                                                          scale_search=1), fmt="gguf", gguf_type=qtype))
    return made


def lines(n_per_text: int | None = None) -> list[str]:
    out = []
    for path in TEXTS:
        with open(path, encoding="utf-8") as fh:
            out += [ln for ln in fh.read().splitlines() if ln.strip()][:n_per_text]
    return out


def mean_pooled(model, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_file_is_bert_as_convert_writes_it(files, minilm_dir, qtype):
    path, result = files[qtype]
    r = gguf.GGUFReader(path)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = json.load(open(os.path.join(minilm_dir, "config.json")))
    assert field("general.architecture") == "bert"
    assert field("general.file_type") == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    assert (field("bert.context_length"), field("bert.embedding_length"), field("bert.feed_forward_length"),
            field("bert.block_count"), field("bert.attention.head_count")) == (512, 384, 1536, 6, 12)
    assert field("bert.attention.layer_norm_epsilon") == pytest.approx(cfg["layer_norm_eps"])
    assert field("bert.attention.causal") is False
    assert field("bert.pooling_type") == gguf.PoolingType.MEAN  # 1_Pooling/config.json: pooling_mode_mean_tokens
    want = {"token_embd.weight", "token_types.weight", "position_embd.weight", "token_embd_norm.weight",
            "token_embd_norm.bias"}
    want |= {f"blk.{i}.{p}.{s}" for i in range(6) for p in LAYER_PARTS for s in ("weight", "bias")}
    assert {t.name for t in r.tensors} == want  # no position_ids, no pooler: llama.cpp refuses extra tensors
    from safetensors.torch import load_file

    src = load_file(os.path.join(minilm_dir, "model.safetensors"))
    hf = {"token_embd": "embeddings.word_embeddings", "position_embd": "embeddings.position_embeddings",
          "token_types": "embeddings.token_type_embeddings", "attn_q": "attention.self.query",
          "attn_k": "attention.self.key", "ffn_down": "output.dense"}
    for t in r.tensors:
        part = t.name.split(".")[-2]
        if t.name.endswith(".bias") or "norm" in t.name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        if part in LINEAR:
            assert t.tensor_type == gguf.GGMLQuantizationType[qtype], t.name
            if part in hf:  # llama.cpp's reference rounding of the HF weight, bit for bit: no row permutation
                w = src[f"encoder.layer.{t.name.split('.')[1]}.{hf[part]}.weight"].float().numpy()
                assert np.array_equal(np.array(t.data), gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]))
        elif t.name == "token_embd.weight":  # the GGUF default: Q8_0 (an encoder has no separate output layer)
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            w = src["embeddings.word_embeddings.weight"].float().numpy()
            assert np.array_equal(np.array(t.data), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
        else:  # position_embd / token_types always F32, as the converter writes them
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert np.array_equal(np.array(t.data), src[hf[t.name.split(".")[0]] + ".weight"].numpy())
    assert any("pooling MEAN" in n for n in result["notes"])


def test_vocab_fields(files, minilm_dir):
    r = gguf.GGUFReader(files["Q8_0"][0])
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "bert"
    assert field("tokenizer.ggml.pre") == "bert-bge"  # convert_hf_to_gguf.py's name for this probe hash
    with open(os.path.join(minilm_dir, "vocab.txt"), encoding="utf-8") as fh:
        vocab = fh.read().splitlines()
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert len(tokens) == len(vocab) == 30522
    # llama.cpp's phantom space: word starts get U+2581, '##' continuations lose the prefix, control tokens stay
    assert tokens == [v if v in special else v[2:] if v.startswith("##") else "\u2581" + v for v in vocab]
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == [0, 100, 101, 102, 103]
    assert set(types) == {gguf.TokenType.NORMAL, gguf.TokenType.CONTROL}
    ids = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "seperator", "padding", "mask")}
    assert ids == {"bos": 101, "eos": 102, "unknown": 100, "seperator": 102, "padding": 0, "mask": 103}
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.token_type_count") == 2
    assert field("tokenizer.ggml.normalizer.lowercase") is True


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_reader_round_trip_equals_kbit_decode(files, minilm_dir, tmp_path, qtype):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = files[qtype][0]
    reader = open_reader(path)
    decode(path, str(tmp_path / "dec"))
    decoded = {}
    for f in glob.glob(str(tmp_path / "dec" / "*.safetensors")):
        decoded.update(load_file(f))
    src = load_file(os.path.join(minilm_dir, "model.safetensors"))
    assert set(decoded) == set(reader.names) == set(src) - {"embeddings.position_ids", "pooler.dense.weight",
                                                             "pooler.dense.bias"}
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = {"encoder.layer.3.attention.self.query.weight": "blk.3.attn_q.weight",
             "encoder.layer.5.output.dense.weight": "blk.5.ffn_down.weight"}
    for hf, gg in names.items():  # the gguf package's own dequantization, under transformers' name
        t = raw[gg]
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(src[hf].shape)
        assert torch.equal(decoded[hf], ref) and torch.equal(reader.tensor(hf, torch.float32), ref)
        err = (ref - src[hf]).norm() / src[hf].norm()
        assert 0 < err < (0.01 if qtype == "Q8_0" else 0.15), (hf, float(err))
    for n in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.output.LayerNorm.bias",
              "encoder.layer.2.intermediate.dense.weight"):
        assert torch.equal(decoded[n], reader.tensor(n, torch.float32)), n
    cfg = json.load(open(tmp_path / "dec" / "config.json"))
    assert cfg["model_type"] == "bert" and cfg["type_vocab_size"] == 2 and cfg["layer_norm_eps"] == 1e-12
    model = BertModel(BertConfig(**cfg), add_pooling_layer=False).eval()
    model.load_state_dict(decoded, strict=True)
    dense = BertModel.from_pretrained(minilm_dir, add_pooling_layer=False).eval()
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "dec"))  # rebuilt from the GGUF's vocabulary
    theirs = AutoTokenizer.from_pretrained(minilm_dir)
    texts = lines()  # every line of the bundled texts
    assert [ours(t).input_ids for t in texts] == [theirs(t).input_ids for t in texts]
    texts = lines(8)
    cos = torch.nn.functional.cosine_similarity(mean_pooled(model, ours, texts), mean_pooled(dense, theirs, texts))
    assert cos.min() > (0.999 if qtype == "Q8_0" else 0.95), float(cos.min())


def folder_copy(minilm_dir: str, dst: str, drop: tuple[str, ...] = ()) -> str:
    os.makedirs(dst)
    for f in os.listdir(minilm_dir):
        if f in drop:
            continue
        src = os.path.join(minilm_dir, f)
        if f == "model.safetensors":
            os.symlink(src, os.path.join(dst, f))
        elif os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, f))
        else:
            shutil.copy(src, os.path.join(dst, f))
    return dst


def test_bert_without_tokenizer_is_refused(minilm_dir, tmp_path):
    src = folder_copy(minilm_dir, str(tmp_path / "bare"), drop=("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                                "special_tokens_map.json"))
    dst = str(tmp_path / "out" / "m.gguf")
    os.makedirs(os.path.dirname(dst))
    r = cli("encode", src, dst, "--format", "gguf", "--gguf-type", "Q8_0")
    assert_bad_input(r, "without its tokenizer", "tokenizer.json", dst=dst)
    assert os.listdir(os.path.dirname(dst)) == []


def test_unsupported_pooling_is_refused(minilm_dir, tmp_path):
    src = folder_copy(minilm_dir, str(tmp_path / "maxpool"))
    with open(os.path.join(src, "1_Pooling", "config.json"), "w") as fh:
        json.dump({"word_embedding_dimension": 384, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, fh)
    dst = str(tmp_path / "out" / "m.gguf")
    os.makedirs(os.path.dirname(dst))
    r = cli("encode", src, dst, "--format", "gguf", "--gguf-type", "Q4_0")
    assert_bad_input(r, "pooling_mode_max_tokens", "mean tokens, the CLS token or the last token", dst=dst)
    assert os.listdir(os.path.dirname(dst)) == []


@pytest.mark.parametrize("drop, set_, words, code", [
    (("bert.embedding_length",), None, ["has no bert.embedding_length", "convert_hf_to_gguf.py"], 2),
    ((), {"bert.block_count": 13}, ["bert.block_count 13 needs at least 108 tensors", "has 101"], 2),
    ((), {"bert.block_count": 7}, ["'encoder.layer.6.attention.self.query.weight' is damaged", "no blk.6.attn_q"], 1),
    ((), {"bert.block_count": 5}, ["'blk.5.", "bert.block_count is 5"], 2),  # a block the metadata does not count
    ((), {"bert.attention.head_count": 5}, ["embedding_length 384 is not a multiple of", "head_count 5"], 2),
    ((), {"bert.feed_forward_length": 1024}, ["tensor 'encoder.layer.0.intermediate.dense.weight' is damaged",
                                              "[1536, 384]", "[1024, 384]"], 1),
])
def test_bad_bert_metadata_is_refused(files, tmp_path, drop, set_, words, code):
    from test_hostile_foreign import gguf_copy

    path = gguf_copy(files["Q8_0"][0], str(tmp_path / "x.gguf"), drop=drop, set_=set_)
    out = str(tmp_path / "out")
    assert_bad_input(cli("decode", path, out, "--quiet"), *words, dst=out, code=code)


def test_load_model_runs_a_bert_gguf_without_its_pooler(files, minilm_dir):
    """kbit's loader builds the BertModel without a pooler (the file has none, as llama.cpp's converter writes
    it) and embeds text like the original model: `kbit bench`/Python can score the GGUF itself."""
    from transformers import AutoModel, AutoTokenizer

    from kbitcli.models.load import load_model

    model, _ = load_model(files["Q8_0"][0], tokenizer=False)
    assert getattr(model, "pooler", None) is None
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts = lines(4)
    ref = mean_pooled(AutoModel.from_pretrained(minilm_dir).eval(), tok, texts)
    cos = torch.nn.functional.cosine_similarity(mean_pooled(model, tok, texts), ref, dim=-1)
    assert cos.min() > 0.999
