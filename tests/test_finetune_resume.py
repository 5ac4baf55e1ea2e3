"""Interrupt and resume: Ctrl-C (a real SIGINT) stops after a step with a checkpoint; --resume continues from
it and ends with exactly the adapter of the uninterrupted run with the same seed (dropout on, so the RNG
state matters too)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from safetensors.torch import load_file

from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.finetune import TrainConfig, finetune
from kbitcli.finetune.checkpoint import list_checkpoints
from kbitcli.recipes import Recipe

CFG = TrainConfig(rank=4, alpha=8, dropout=0.1, lr=3e-3, steps=6, batch_size=2, context=32, warmup=2,
                  eval_every=0, save_every=2, seed=7)


@pytest.fixture(scope="module")
def setup(stories_dir, tinystories_text, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    model = str(d / "s260-nf4")
    encode(stories_dir, model, Recipe(bits=4, block_size=64, dtype="nf"))
    data = str(d / "train.txt")
    with open(tinystories_text) as src, open(data, "w") as dst:
        dst.write(src.read()[:6000])
    return model, data


def adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_sigint_then_resume_equals_uninterrupted(setup, tmp_path):
    model, data = setup
    straight = str(tmp_path / "straight")
    finetune(model, straight, data, CFG)

    out = str(tmp_path / "interrupted")

    def ctrl_c_at_3(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KbitError) as e:
        finetune(model, out, data, CFG, on_step=ctrl_c_at_3)
    assert e.value.exit_code == 1 and "--resume" in str(e.value)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    assert json.load(open(os.path.join(out, "finetune_run.json")))["status"] == "interrupted"

    s = finetune(model, out, data, CFG, resume=True)
    assert s["start_step"] == 3 and s["tokens_trained"] == 3 * 2 * 32
    a, b = adapter(straight), adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit for bit
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "train_log.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_more_steps_continues_the_run(setup, tmp_path):
    model, data = setup
    cfg4 = TrainConfig(**{**CFG.as_dict(), "steps": 4, "targets": None})
    out = str(tmp_path / "grow")
    finetune(model, out, data, cfg4)
    s = finetune(model, out, data, CFG, resume=True)  # the same run, asked to go on to step 6
    assert s["start_step"] == 4
    straight = str(tmp_path / "straight6")
    finetune(model, straight, data, CFG)
    a, b = adapter(straight), adapter(out)
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_refuses_other_settings(setup, tmp_path):
    model, data = setup
    out = str(tmp_path / "r")
    finetune(model, out, data, TrainConfig(**{**CFG.as_dict(), "steps": 2, "targets": None}))
    before = sorted(os.listdir(out))
    with pytest.raises(KbitError, match="rank=4.*rank=8") as e:
        finetune(model, out, data, TrainConfig(**{**CFG.as_dict(), "rank": 8, "targets": None}), resume=True)
    assert e.value.exit_code == 2 and sorted(os.listdir(out)) == before
