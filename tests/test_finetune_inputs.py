"""Bad input to `kbit finetune`: one-line error, exit 2, nothing written. Plus the data pipeline's rules."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from kbitcli.commands.app import app
from kbitcli.errors import KbitError
from kbitcli.finetune.config import from_dict, load_config
from kbitcli.finetune.data import batch_indices, load_blocks
from kbitcli.hf import load_tokenizer

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "finetune-lora.yaml")


@pytest.fixture(scope="module")
def train_txt(tinystories_text, tmp_path_factory):
    p = tmp_path_factory.mktemp("inp-text") / "train.txt"
    p.write_text(open(tinystories_text).read()[:4000])
    return str(p)


def fails(args, tmp_path, needle):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["finetune", *args[:1], str(out), *args[1:], "--steps", "2", "--context", "32"])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("kbit: error:") and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return err


def test_dense_model_is_refused_with_the_encode_hint(stories_dir, train_txt, tmp_path):
    fails([stories_dir, "--data", train_txt], tmp_path, "kbit encode")


def test_empty_data(nf4, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    fails([nf4, "--data", str(empty)], tmp_path, "holds no text")


def test_too_short_data(nf4, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time")
    fails([nf4, "--data", str(short)], tmp_path, "fewer than one block")


def test_too_short_eval_data(nf4, train_txt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Hi.")
    fails([nf4, "--data", train_txt, "--eval-data", str(short)], tmp_path, "--eval-data")


def test_targets_that_match_nothing(nf4, train_txt, tmp_path):
    fails([nf4, "--data", train_txt, "--targets", "re:.*qproj"], tmp_path, "matches no linear layer")


@pytest.mark.parametrize("rank", ["0", "-4"])
def test_rank_not_positive(nf4, train_txt, tmp_path, rank):
    fails([nf4, "--data", train_txt, "--rank", rank], tmp_path, "rank must be a positive integer")


def test_resume_without_checkpoint(nf4, train_txt, tmp_path):
    fails([nf4, "--data", train_txt, "--resume"], tmp_path, "no checkpoint to resume")


def test_bad_merge_and_context(nf4, train_txt, tmp_path):
    fails([nf4, "--data", train_txt, "--merge", "gguf"], tmp_path, "choose kbit or dense")
    r = CliRunner().invoke(app, ["finetune", nf4, str(tmp_path / "o"), "--data", train_txt, "--context", "4096"])
    assert r.exit_code == 2 and "positions" in r.stderr


def test_existing_out_needs_force_or_resume(nf4, train_txt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(app, ["finetune", nf4, str(out), "--data", train_txt, "--steps", "1"])
    assert r.exit_code == 2 and "--resume" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_recipe_keys_are_checked(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rank: 8\nlearning_rate: 1e-3\n")
    with pytest.raises(KbitError, match="learning_rate"):
        load_config(str(p))
    assert load_config(RECIPE).grad_clip == 0.3
    with pytest.raises(KbitError, match="dropout"):
        from_dict({"dropout": 1.5}, "x")


def test_jsonl_documents_and_plain_text(stories_dir, tmp_path):
    tok = load_tokenizer(stories_dir)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["Once upon a time there was a cat.", "The end."]) + "\n")
    blocks = load_blocks(str(p), tok, 4)
    flat = blocks.reshape(-1).tolist()
    assert flat[0] == tok.bos_token_id and tok.eos_token_id in flat  # BOS per document, EOS between them
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(KbitError, match=r"bad.jsonl:2"):
        load_blocks(str(bad), tok, 4)


def test_batches_are_a_function_of_seed_and_step():
    seen = torch.cat([batch_indices(10, 4, seed=3, step=s) for s in range(1, 6)])  # 20 picks = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 3, 4), batch_indices(10, 4, 3, 4))
    assert not torch.equal(batch_indices(10, 4, 3, 1), batch_indices(10, 4, 4, 1))
