"""--format gguf: the `gguf` package reads back what kbit writes (metadata, llama.cpp names, block types), and
transformers' own GGUF loader (from_pretrained(..., gguf_file=...)) builds the same model kbit's reader does."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from kbitcli.decode import decode
from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.formats.registry import open_reader as open_foreign
from kbitcli.formats.gguf_format import permute
from kbitcli.formats.source import open_source
from kbitcli.paths import TINYSTORIES_TEXT
from kbitcli.recipes import Recipe, parse_override
from interop_fixtures import logits, make_tiny_llama

gguf = pytest.importorskip("gguf")
SKIP_FFN_DOWN = parse_override("model.layers.*.mlp.down_proj=skip")  # stories260K's rows of 172 stay F32
# per type: bits, and the SQNR (dB) it must reach on the tiny model's Gaussian weights (Q4 ~ 18, Q5 ~ 24, Q8 ~ 40)
TYPES = {"Q4_0": (4, 16.0), "Q4_1": (4, 16.0), "Q5_0": (5, 22.0), "Q5_1": (5, 22.0), "Q8_0": (8, 38.0)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"))


def hf_model_from(reader):
    """A transformers Llama built from kbit's reader: config it rebuilt, weights it dequantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**reader.config)).eval()
    state = {n: reader.tensor(n, torch.float32) for n in reader.names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("qtype", list(TYPES))
def test_gguf_package_reads_back_every_type(tiny, tmp_path, qtype):
    bits, min_sqnr = TYPES[qtype]
    dst = str(tmp_path / "tiny.gguf")
    encode(tiny, dst, Recipe(bits=bits, block_size=32, dtype="int", scale_search=1), fmt="gguf", gguf_type=qtype)
    r = gguf.GGUFReader(dst)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    assert (field("llama.context_length"), field("llama.embedding_length"), field("llama.block_count"),
            field("llama.feed_forward_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.rope.dimension_count")) == (256, 128, 2, 256, 4, 2, 32)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.tokens")) == 512
    src = open_source(tiny)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    hf = {names.get_name(n, try_suffixes=(".weight",)): n for n in src.names}
    assert {t.name for t in r.tensors} == set(hf)  # llama.cpp's names: token_embd, blk.N.attn_q, output, ...
    sig = noise = 0.0
    for t in r.tensors:
        w = src.get(hf[t.name]).float()
        if t.name.endswith("attn_q.weight"):
            w = permute(w, 4, 4)  # llama.cpp's rotary row order, as convert_hf_to_gguf.py writes it
        elif t.name.endswith("attn_k.weight"):
            w = permute(w, 4, 2)
        back = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(w.shape)
        if w.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(back, w)
            continue
        # the GGUF default (gguf_format.embeddings_default), as llama-quantize does: token_embd at the file's
        # type (this tiny Llama has its own output layer), output at the nearest wider type kbit writes, Q8_0
        want = "Q8_0" if hf[t.name] == "lm_head.weight" else qtype
        assert t.tensor_type == gguf.GGMLQuantizationType[want], t.name
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[want])  # llama.cpp's rounding, bit for bit
        assert np.array_equal(np.array(t.data), ref), t.name
        if want == qtype:
            sig += w.double().pow(2).sum().item()
            noise += (w - back).double().pow(2).sum().item()
    assert 10 * math.log10(sig / noise) > min_sqnr


def test_transformers_gguf_loader_equals_kbit_reader(stories_dir, tmp_path):
    """stories260K (FFN down kept F32: rows of 172) through each type: transformers' GGUF loader and kbit's reader
    give the same logits, and the tokenizer in the file tokenizes like the original."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for qtype, (bits, _) in TYPES.items():
        dst = tmp_path / f"s-{qtype}.gguf"
        encode(stories_dir, str(dst), Recipe(bits=bits, block_size=32, dtype="int", scale_search=1,
                                             overrides=[SKIP_FFN_DOWN]), fmt="gguf", gguf_type=qtype)
        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=dst.name)
        diff = (logits(theirs) - logits(hf_model_from(open_foreign(str(dst))))).abs().max().item()
        assert diff < 1e-5, (qtype, diff)
    # stories260K's tokenizer.json also strips outer spaces (llama.cpp's SPM tokenizer keeps them): compare text
    # without them
    text = open(TINYSTORIES_TEXT).read()[:6000].strip()
    ref = AutoTokenizer.from_pretrained(stories_dir)(text).input_ids
    assert AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s-Q8_0.gguf")(text).input_ids == ref


def test_decode_gguf_gives_a_transformers_folder(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = tmp_path / "s.gguf"
    encode(stories_dir, str(dst), Recipe(bits=8, block_size=32, dtype="int", scale_search=1,
                                         overrides=[SKIP_FFN_DOWN]), fmt="gguf")
    decode(str(dst), str(tmp_path / "dense"), "fp32")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "dense"))
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    assert (logits(dense) - logits(theirs)).abs().max().item() < 1e-5
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "dense"))
    assert tok("Once upon a time").input_ids == AutoTokenizer.from_pretrained(stories_dir)("Once upon a time").input_ids


def test_keeping_a_tensor_dense_is_shown_in_the_plan(stories_dir, tmp_path):
    r = encode(stories_dir, str(tmp_path / "x.gguf"), Recipe(bits=4, block_size=32, dtype="int", scale_search=1,
                                                             overrides=[SKIP_FFN_DOWN]), fmt="gguf", dry_run=True)
    rows = {p["name"]: p for p in r["plan"]}
    assert rows["model.layers.0.mlp.down_proj.weight"]["dtype"] == "F32"
    assert rows["model.layers.0.mlp.up_proj.weight"]["data_type"] == "Q4_0"
    assert rows["model.layers.0.mlp.up_proj.weight"]["gguf_name"] == "blk.0.ffn_up.weight"
    assert rows["model.layers.0.mlp.up_proj.weight"]["bits_per_param"] == 4.5
    assert any(n.startswith("tokenizer: 'llama'") and "512 tokens" in n for n in r["notes"])  # SentencePiece-style
    assert not os.path.exists(tmp_path / "x.gguf")


def test_rows_no_block_type_holds_are_planned_f16(stories_dir, tmp_path):
    """stories260K's FFN rows of 172 (not a multiple of 32) are written F16, shown in the plan before any work
    (their rule and a note naming the override that keeps them as stored), and read back as the fp16 weights."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    dst = str(tmp_path / "x.gguf")
    recipe = Recipe(bits=4, block_size=32, dtype="int", scale_search=1)
    r = encode(stories_dir, dst, recipe, fmt="gguf", dry_run=True)
    rows = {p["name"]: p for p in r["plan"]}
    down = rows["model.layers.0.mlp.down_proj.weight"]
    assert "F16" in (down["dtype"], down.get("data_type")) and "not a multiple of 32" in down["rule"], down
    assert rows["model.layers.0.mlp.up_proj.weight"]["data_type"] == "Q4_0"
    assert any("rows of 172" in n and "F16" in n and "=skip" in n for n in r["notes"]), r["notes"]
    assert not os.path.exists(dst)
    encode(stories_dir, dst, recipe, fmt="gguf")
    types = {t.name: t.tensor_type.name for t in GGUFReader(dst).tensors}
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(5)] == ["F16"] * 5
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    from kbitcli.models.load import load_model

    m, _ = load_model(dst, dtype="fp32", tokenizer=False)
    w = load_file(os.path.join(stories_dir, "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight, w.half().float())


@pytest.mark.parametrize("kwargs, words", [
    (dict(recipe=Recipe(bits=4, block_size=64, dtype="int", scale_search=1, overrides=[SKIP_FFN_DOWN])),
     ["Q4_0 uses blocks of 32", "--block-size 32"]),
    (dict(recipe=Recipe(bits=3, block_size=32, dtype="int", scale_search=1, overrides=[SKIP_FFN_DOWN])),
     ["4, 5 or 8 bits", "--bits 4"]),
    (dict(recipe=Recipe(bits=4, block_size=32, dtype="nf", scale_search=1, overrides=[SKIP_FFN_DOWN])),
     ["integer grid", "--data-type int"]),
    (dict(recipe=Recipe(bits=4, block_size=32, dtype="int", scale_search=4, overrides=[SKIP_FFN_DOWN])),
     ["scale search", "--scale-search 1"]),
    (dict(recipe=Recipe(bits=8, block_size=32, dtype="int", scale_search=1, overrides=[SKIP_FFN_DOWN]),
          gguf_type="Q4_1"), ["Q4_1 is 4-bit", "--bits 4"]),
    (dict(recipe=Recipe(bits=4, block_size=32, dtype="int", scale_search=1, overrides=[SKIP_FFN_DOWN]),
          gguf_type="Q3_K"), ["Q4_0, Q4_1"]),
])
def test_refuses_what_gguf_cannot_hold(stories_dir, tmp_path, kwargs, words):
    with pytest.raises(KbitError) as e:
        encode(stories_dir, str(tmp_path / "x.gguf"), kwargs["recipe"], fmt="gguf", gguf_type=kwargs.get("gguf_type"))
    assert e.value.exit_code == 2 and all(w in str(e.value) for w in words), str(e.value)
    assert os.listdir(tmp_path) == []


def test_refuses_non_llama_and_non_gguf_destination(stories_dir, tmp_path, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel  # an architecture --format gguf does not write

    gpt2 = str(tmp_path_factory.mktemp("gpt2") / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(gpt2)
    with pytest.raises(KbitError,
                       match="writes LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, BertModel.*'gpt2'"):
        encode(gpt2, str(tmp_path / "m.gguf"), Recipe(bits=4, block_size=32, dtype="int", scale_search=1),
               fmt="gguf")
    with pytest.raises(KbitError, match="one file"):
        encode(stories_dir, str(tmp_path / "folder"), Recipe(bits=4, block_size=32, dtype="int", scale_search=1,
                                                             overrides=[SKIP_FFN_DOWN]), fmt="gguf")
    assert os.listdir(tmp_path) == []


def test_gguf_default_quantizes_the_tied_embedding_at_q8_0_and_ignore_keeps_it(stories_dir, tmp_path):
    """A tied model's token_embd is also its output layer: Q8_0 by default (llama-quantize: Q6_K), shown in the
    plan and a note; --ignore and an explicit targets list keep it as stored."""
    base = dict(bits=4, block_size=32, dtype="int", scale_search=1, overrides=[SKIP_FFN_DOWN])
    r = encode(stories_dir, str(tmp_path / "d.gguf"), Recipe(**base), fmt="gguf", gguf_type="Q4_0", dry_run=True)
    row = next(t for t in r["plan"] if t["name"] == "model.embed_tokens.weight")
    assert row["quantized"] and row["bits"] == 8 and row["rule"].startswith("gguf default: token_embd Q8_0")
    assert any("token_embd.weight) written Q8_0" in n for n in r["notes"])
    encode(stories_dir, str(tmp_path / "s.gguf"), Recipe(**base), fmt="gguf", gguf_type="Q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "s.gguf")).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0 and "output.weight" not in types
    for recipe in (Recipe(**base, ignore=["model.embed_tokens"]),
                   Recipe(**base, targets=["re:.*(q|k|v|o|gate|up|down)_proj"])):
        r = encode(stories_dir, str(tmp_path / "x.gguf"), recipe, fmt="gguf", gguf_type="Q4_0", dry_run=True)
        row = next(t for t in r["plan"] if t["name"] == "model.embed_tokens.weight")
        assert not row["quantized"] and not any("token_embd" in n for n in r["notes"])
