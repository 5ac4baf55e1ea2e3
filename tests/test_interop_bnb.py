"""--format bnb: bitsandbytes' own functions and transformers+bitsandbytes load what kbit writes, and kbit reads
what bitsandbytes writes. bitsandbytes runs on CPU here; kbit's writer and reader never import it."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.formats.registry import open_reader as open_foreign
from kbitcli.formats.source import open_source
from kbitcli.models.load import load_model
from kbitcli.recipes import Recipe, parse_override
from interop_fixtures import bnb_generic_path, logits, make_tiny_llama

F = pytest.importorskip("bitsandbytes.functional")


def bnb_state(reader, name):
    """bitsandbytes' own QuantState, built by bitsandbytes from the tensors kbit wrote."""
    parts = {k[len(name) + 1:]: reader.f.get(k) for k in reader.f.keys if k.startswith(name + ".")}
    return F.QuantState.from_dict(parts, torch.device("cpu"))


def sqnr(ref, approx):
    return 10 * math.log10(ref.double().pow(2).sum().item() / (ref - approx).double().pow(2).sum().item())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_export_is_bitsandbytes_quantize_4bit(stories_dir, tmp_path, dq):
    """Default bnb export (plain absmax): the packed bytes are bitsandbytes' quantize_4bit's, so SQNR is
    equal."""
    dst = str(tmp_path / "bnb")
    encode(stories_dir, dst, Recipe(bits=4, block_size=64, dtype="nf", double_quant=dq, scale_dtype="fp32",
                                    scale_search=1, scale_refit=False), fmt="bnb")
    reader, src = open_foreign(dst), open_source(stories_dir)
    quantized = [n for n in reader.names if reader.is_quantized(n)]
    assert len(quantized) == 35
    for n in quantized:
        w = src.get(n)
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        ours = reader.tensor(n, torch.float32)
        theirs = F.dequantize_4bit(q, st)
        assert torch.equal(ours, F.dequantize_4bit(reader.f.get(n), bnb_state(reader, n)))  # our reader == bnb's
        if not dq:
            assert torch.equal(reader.f.get(n), q), n  # byte for byte
            assert torch.equal(reader.f.get(f"{n}.absmax"), st.absmax)
            assert sqnr(w, ours) == pytest.approx(sqnr(w, theirs), abs=1e-9)
        else:  # kbit picks codes against the double-quantized scales the decoder sees: never worse
            assert sqnr(w, ours) >= sqnr(w, theirs) - 1e-3


def test_fp4_export_uses_bitsandbytes_table(stories_dir, tmp_path):
    dst = str(tmp_path / "fp4")
    r = encode(stories_dir, dst, Recipe(bits=4, block_size=64, dtype="fp", scale_dtype="fp32", scale_search=1,
                                        scale_refit=False), fmt="bnb")
    assert any("bitsandbytes FP4" in n for n in r["notes"])  # the table change is stated, not silent
    reader, src = open_foreign(dst), open_source(stories_dir)
    for n in (n for n in reader.names if reader.is_quantized(n)):
        assert torch.equal(reader.f.get(f"{n}.quant_map"), F.get_4bit_type("fp4", device="cpu"))
        w = src.get(n)
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
        ours = F.dequantize_4bit(reader.f.get(n), bnb_state(reader, n))
        # same values as bitsandbytes' quantizer (codes may differ only between its two zeros, +0 and -0)
        assert torch.equal(ours, F.dequantize_4bit(q, st)), n
        assert torch.equal(reader.tensor(n, torch.float32), ours)


@pytest.mark.parametrize("dtype", ["nf", "fp"])
def test_bnb_export_with_scale_refit_is_what_bitsandbytes_decodes(stories_dir, tmp_path, dtype):
    """scale_refit in bnb's layout (nf4 through kbit's quantizer, fp4 through the export's own): bitsandbytes
    decodes exactly what kbit's reader decodes, and every tensor is closer to the dense weights than
    bitsandbytes' own quantize_4bit makes it."""
    dst = str(tmp_path / "bnb")
    encode(stories_dir, dst, Recipe(bits=4, block_size=64, dtype=dtype, scale_dtype="fp32", scale_refit=True),
           fmt="bnb")
    reader, src = open_foreign(dst), open_source(stories_dir)
    quantized = [n for n in reader.names if reader.is_quantized(n)]
    assert len(quantized) == 35
    for n in quantized:
        w = src.get(n)
        ours = F.dequantize_4bit(reader.f.get(n), bnb_state(reader, n))
        assert torch.equal(reader.tensor(n, torch.float32), ours)
        q, st = F.quantize_4bit(w, blocksize=64, quant_type=dtype + "4")
        assert not torch.equal(reader.f.get(f"{n}.absmax"), st.absmax)  # refit, not bitsandbytes' absmax
        assert sqnr(w, ours) > sqnr(w, F.dequantize_4bit(q, st)), n


@pytest.mark.parametrize("dq", [False, True])
def test_transformers_logits_equal_kbit_forward(stories_dir, tmp_path, dq):
    """AutoModelForCausalLM.from_pretrained(DST) with bitsandbytes == kbit's own k-bit forward of the same codes.
    down_proj is kept dense to exercise llm_int8_skip_modules (it must list it, and lm_head)."""
    from transformers import AutoModelForCausalLM

    recipe = Recipe(bits=4, block_size=64, dtype="nf", double_quant=dq, scale_dtype="fp32",
                    overrides=[parse_override("model.layers.*.mlp.down_proj=skip")])
    encode(stories_dir, str(tmp_path / "kbit"), recipe)
    encode(stories_dir, str(tmp_path / "bnb"), recipe, fmt="bnb")
    qc = json.load(open(tmp_path / "bnb" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_use_double_quant"] is dq
    assert set(qc["llm_int8_skip_modules"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(5)} | {"lm_head"}
    ours, _ = load_model(str(tmp_path / "kbit"), tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"))
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear"
    # stories260K's FFN rows (172) are not a multiple of 32, which bnb's CPU AVX512 kernel needs: generic path
    ref = logits(ours)
    diff = (ref - logits(bnb_generic_path(theirs))).abs().max().item()
    # same decoded weights; kbit's fused kernel (core/matvec.py) sums in another order than MKL: a few ulps
    assert diff < 4e-6 * ref.abs().max().item(), diff


def test_bitsandbytes_cpu_kernel_on_tiny_llama(tiny, tmp_path):
    """On 128-multiple shapes bitsandbytes' own CPU kernel runs (bf16 compute where AVX512-BF16 exists)."""
    from transformers import AutoModelForCausalLM

    recipe = Recipe(bits=4, block_size=64, dtype="nf", scale_dtype="fp32")
    encode(tiny, str(tmp_path / "kbit"), recipe)
    encode(tiny, str(tmp_path / "bnb"), recipe, fmt="bnb", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "bnb" / "model.safetensors.index.json")  # sharded, loads through the index
    ref = logits(load_model(str(tmp_path / "kbit"), tokenizer=False)[0])
    fast = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb")))
    assert (fast - ref).abs().max().item() < 0.05 * ref.abs().max().item()  # its kernel computes in bf16
    # (the kernel repacks the weights on first use, so the generic path needs a fresh load)
    generic = logits(bnb_generic_path(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"))))
    assert (generic - ref).abs().max().item() < 4e-6 * ref.abs().max().item()


def test_reader_decodes_a_checkpoint_bitsandbytes_wrote(stories_dir, tmp_path):
    """transformers+bitsandbytes quantize and save stories260K (nf4 + double quant); kbit reads and decodes it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=cfg, device_map="cpu")
    model.save_pretrained(str(tmp_path / "theirs"))
    reader = open_foreign(str(tmp_path / "theirs"))
    assert type(reader).__name__ == "BnbCheckpoint"
    for n in (n for n in reader.names if reader.is_quantized(n)):
        assert torch.equal(reader.tensor(n, torch.float32), F.dequantize_4bit(reader.f.get(n), bnb_state(reader, n)))
    from kbitcli.decode import decode

    decode(str(tmp_path / "theirs"), str(tmp_path / "dense"), "fp32")
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert "quantization_config" not in json.load(open(tmp_path / "dense" / "config.json"))
    diff = (logits(dense) - logits(bnb_generic_path(model))).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("recipe, words", [
    (Recipe(bits=3, dtype="nf", scale_dtype="fp32"), ["4-bit", "--bits 4"]),
    (Recipe(bits=4, dtype="int", scale_dtype="fp32"), ["nf4/fp4", "--data-type nf"]),
    (Recipe(bits=4, block_size=16, scale_dtype="fp32"), ["32 to 4096", "--block-size 32"]),
    (Recipe(bits=4, block_size="row", scale_dtype="fp32"), ["block row", "--block-size 64"]),
    (Recipe(bits=4, scale_dtype="fp16"), ["fp32 absmax", "--scale-dtype fp32"]),
    (Recipe(bits=4, scale_dtype="fp32", overrides=[parse_override("re:.*q_proj=dtype:fp")]), ["one quant type"]),
    (Recipe(bits=4, scale_dtype="fp32", targets=["model.embed_tokens.weight"]), ["nn.Linear", "=skip"]),
])
def test_refuses_what_bnb_cannot_hold(stories_dir, tmp_path, recipe, words):
    dst = tmp_path / "out"
    with pytest.raises(KbitError) as e:
        encode(stories_dir, str(dst), recipe, fmt="bnb")
    assert e.value.exit_code == 2 and all(w in str(e.value) for w in words), str(e.value)
    assert not dst.exists() and os.listdir(tmp_path) == []  # nothing written, not even a temporary
