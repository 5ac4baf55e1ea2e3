"""The CLI for foreign formats: `kbit encode --format`, and `kbit inspect` / `kbit decode` reading them back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from kbitcli.commands.app import app
from kbitcli.models.load import load_model
from interop_fixtures import logits

runner = CliRunner()
SKIP_DOWN = "model.layers.*.mlp.down_proj=skip"


def kbit(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exports(stories_dir, tmp_path_factory):
    """stories260K written in all three formats through the CLI, with each format's own defaults."""
    root = tmp_path_factory.mktemp("exports")
    runs = {"bnb": ["--format", "bnb"],
            "ct": ["--format", "compressed-tensors", "--override", "model.layers.*.mlp.down_proj=block_size:row"],
            "gguf": ["--format", "gguf", "--override", SKIP_DOWN]}
    out = {}
    for name, flags in runs.items():
        dst = root / ("s.gguf" if name == "gguf" else name)
        r = kbit("encode", stories_dir, dst, *flags, "--json")
        assert r.exit_code == 0, r.output
        out[name] = (str(dst), json.loads(r.stdout))
    return out


def test_encode_json_reports_the_format_and_its_own_defaults(exports):
    bnb, ct, gg = (exports[k][1] for k in ("bnb", "ct", "gguf"))
    assert (bnb["format"], ct["format"], gg["format"]) == ("bnb", "compressed-tensors", "gguf")
    assert bnb["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # 4 + 32/64 (fp32 absmax) + each tensor's own quant_map and quant_state JSON, which are large on tiny tensors
    assert 4.5 < bnb["bits_per_param_quantized"] < 4.7
    # stories260K is tied: its token_embd, also the output layer, is Q8_0 by default (gguf_format.embeddings_default)
    assert {p["data_type"] for p in gg["plan"] if p["quantized"]} == {"Q4_0", "Q8_0"}
    assert [p["name"] for p in gg["plan"] if p.get("data_type") == "Q8_0"] == ["model.embed_tokens.weight"]
    assert {p["data_type"] for p in ct["plan"] if p["quantized"]} == {"int4 g64", "int4 channel"}


@pytest.mark.parametrize("fmt", ["bnb", "ct", "gguf"])
def test_inspect_and_decode_read_every_format(exports, tmp_path, fmt, stories_dir):
    from transformers import AutoModelForCausalLM

    path, _ = exports[fmt]
    r = kbit("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == {"bnb": "bnb", "ct": "compressed-tensors", "gguf": "gguf"}[fmt]
    assert info["tensors"] == 47 and info["quantized_tensors"] == (31 if fmt == "gguf" else 35)  # gguf: + token_embd
    assert info["bits_per_param_quantized"] == pytest.approx(exports[fmt][1]["bits_per_param_quantized"], abs=1e-3)
    assert kbit("inspect", path, "--verify").exit_code == 0  # the manifest kbit wrote beside the export
    r = kbit("decode", path, tmp_path / "dense", "--torch-dtype", "fp32", "--json")
    assert r.exit_code == 0, r.output
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    model, tok = load_model(path)  # kbit's readers, as `kbit bench` can run them
    assert tok is not None
    assert (logits(dense) - logits(model)).abs().max().item() < 1e-6
    original = logits(AutoModelForCausalLM.from_pretrained(stories_dir)).flatten()
    cos = torch.nn.functional.cosine_similarity(logits(dense).flatten(), original, dim=0).item()
    assert cos > 0.98, cos  # 4-bit, still the same model


def test_refusal_is_one_line_exit_2_and_writes_nothing(stories_dir, tmp_path):
    r = kbit("encode", stories_dir, tmp_path / "x.gguf", "--format", "gguf", "--block-size", "64")
    assert r.exit_code == 2
    assert "Q4_0 uses blocks of 32" in r.output and "--block-size 32" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "x.gguf")
    r = kbit("encode", stories_dir, tmp_path / "b", "--format", "bnb", "--bits", "3")
    assert r.exit_code == 2 and "bnb holds only 4-bit nf4/fp4" in r.output and "--bits 4" in r.output
    r = kbit("encode", stories_dir, tmp_path / "c", "--format", "compressed-tensors")
    assert r.exit_code == 2 and "model.layers.*.mlp.down_proj=block_size:row" in r.output
    r = kbit("encode", stories_dir, tmp_path / "d", "--format", "onnx")
    assert r.exit_code == 2 and "kbit, bnb, compressed-tensors, gguf" in r.output
    assert os.listdir(tmp_path) == []


def test_gguf_type_flag_sets_the_bits(stories_dir, tmp_path):
    r = kbit("encode", stories_dir, tmp_path / "q.gguf", "--format", "gguf", "--gguf-type", "Q5_1",
             "--override", SKIP_DOWN, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    proj = [p for p in plan if p["quantized"] and p["name"] != "model.embed_tokens.weight"]  # that one: Q8_0
    assert {p["data_type"] for p in proj} == {"Q5_1"} and {p["bits_per_param"] for p in proj} == {6.0}
    assert not os.path.exists(tmp_path / "q.gguf")


def test_verify_detects_a_changed_export(exports, tmp_path):
    import shutil

    copy = tmp_path / "bnb"
    shutil.copytree(exports["bnb"][0], copy)
    with open(copy / "config.json", "a") as fh:
        fh.write(" ")
    r = kbit("inspect", copy, "--verify")
    assert r.exit_code == 1 and "config.json" in r.output
