"""Two things are called "dtype" in kbit, so no flag is: `--data-type/-t` is the codebook data type of encode
and bench (int | fp | nf | quantile | dynamic, the recipe key `dtype`), `--torch-dtype` the torch dtype of
decode, generate and finetune (fp32 | fp16 | bf16). The old `--dtype` must mean neither: on every command that
had it, it exits 2 with one line naming both new flags, before anything is read or written."""

from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open

from kbit_cli import assert_bad_input, cli


def test_data_type_reaches_the_plan(stories_dir, tmp_path):
    dst = tmp_path / "q"
    r = cli("encode", stories_dir, dst, "--data-type", "int", "-k", "8", "--json")
    assert r.code == 0, r.stderr
    info = json.loads(cli("inspect", dst, "--json").stdout)
    quantized = [p for p in info["plan"] if p["quantized"]]
    assert len(quantized) == 35 and {(p["data_type"], p["bits"]) for p in quantized} == {("int", 8)}
    manifest = json.loads((dst / "kbit_manifest.json").read_text())
    assert manifest["recipe"]["dtype"] == "int" and manifest["recipe"]["bits"] == 8  # the recipe key stays `dtype`


def test_short_t_is_the_data_type(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "q", "-t", "quantile", "-k", "3", "--dry-run", "--json")
    assert r.code == 0, r.stderr
    assert {p["data_type"] for p in json.loads(r.stdout)["plan"] if p["quantized"]} == {"quantile"}


def test_torch_dtype_of_decode(stories_dir, tmp_path):
    assert cli("encode", stories_dir, tmp_path / "q", "--data-type", "nf", "--quiet").code == 0
    r = cli("decode", tmp_path / "q", tmp_path / "d", "--torch-dtype", "bf16", "--json")
    assert r.code == 0, r.stderr
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}


def test_a_codebook_type_as_torch_dtype_names_the_right_flag(stories_dir, tmp_path):
    assert cli("encode", stories_dir, tmp_path / "q", "--quiet").code == 0
    r = cli("decode", tmp_path / "q", tmp_path / "d", "--torch-dtype", "nf")
    assert_bad_input(r, "--torch-dtype 'nf'", "--data-type", dst=str(tmp_path / "d"))


REMOVED = "--dtype is ambiguous and was removed: use --data-type"


@pytest.mark.parametrize("args", [
    ["encode", "{model}", "{tmp}/q", "--dtype", "nf"],
    ["encode", "{model}", "{tmp}/q", "-k", "4", "--dtype", "fp32", "--json"],
    ["decode", "{tmp}/kbit", "{tmp}/q", "--dtype", "bf16"],
    ["generate", "{model}", "--dtype", "fp32", "-n", "2"],
    ["finetune", "{tmp}/kbit", "{tmp}/q", "--data", "{tmp}/train.txt", "--dtype", "bf16"],
    ["bench", "error", "{model}", "--out", "{tmp}/q", "--dtype", "nf"],
    ["bench", "ppl", "{model}", "--text", "{tmp}/train.txt", "--dtype", "nf"],
    ["bench", "speed", "{model}", "--out", "{tmp}/q", "--dtype", "nf"],
], ids=lambda a: " ".join(a[:2]) if a[0] == "bench" else a[0])
def test_old_dtype_is_refused_everywhere(stories_dir, tmp_path, args):
    # decode/finetune would need a kbit checkpoint and a text: --dtype must be refused before they are looked at
    argv = [a.format(model=stories_dir, tmp=tmp_path) for a in args]
    r = cli(*argv)
    want = "--compute-dtype" if args[:2] == ["bench", "speed"] else "--torch-dtype"
    assert_bad_input(r, REMOVED, want, dst=str(tmp_path / "q"))
    assert os.listdir(tmp_path) == []


def test_help_names_the_two_meanings():
    enc = cli("encode", "--help", env={"COLUMNS": "200"}).stdout
    assert "--data-type" in enc and "Codebook data type" in enc and "--dtype" not in enc
    dec = cli("decode", "--help", env={"COLUMNS": "200"}).stdout
    assert "--torch-dtype" in dec and "Torch dtype" in dec and "--dtype" not in dec
    for cmd in ("generate", "finetune"):
        h = cli(cmd, "--help", env={"COLUMNS": "200"}).stdout
        assert "--torch-dtype" in h and "--dtype " not in h and "--data-type" not in h
