"""kbit finetune on the real stories260K, encoded NF4 / block 64: training lowers the loss, the adapter is a
real PEFT adapter (peft loads it onto the decoded model and gives kbit's own logits), merges load and score."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from kbitcli.commands.app import app
from kbitcli.decode import decode
from kbitcli.encode import encode
from kbitcli.finetune import train
from kbitcli.finetune.data import load_blocks
from kbitcli.finetune.lora import LoraLinear, attach_lora, select_targets
from kbitcli.finetune.merge import merge
from kbitcli.finetune.peft_io import apply_adapter, read_adapter
from kbitcli.io.manifest import MANIFEST
from kbitcli.models.kbit_linear import KbitLinear
from kbitcli.models.load import load_model
from kbitcli.recipes import Recipe

# real English text the model (trained on TinyStories) has not seen; repeated, so a few steps can learn it
SNIPPET = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.\n")

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "finetune-lora.yaml")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft-text")
    (d / "train.txt").write_text(SNIPPET * 40)
    (d / "eval.txt").write_text(SNIPPET * 6)
    return str(d / "train.txt"), str(d / "eval.txt")


@pytest.fixture(scope="module")
def trained(nf4, texts, tmp_path_factory):
    """One CLI run: 16 steps, rank 4, with --merge kbit; (summary, OUT)."""
    out = str(tmp_path_factory.mktemp("ft-run") / "run")
    args = ["finetune", nf4, out, "--data", texts[0], "--eval-data", texts[1], "--recipe", RECIPE,
            "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--steps", "16", "--batch-size", "4", "--context", "64",
            "--dropout", "0", "--warmup", "2", "--eval-every", "8", "--save-every", "8", "--merge", "kbit", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), out


def test_training_lowers_train_and_eval_loss(trained):
    s, out = trained
    assert s["steps"] == 16 and s["tokens_trained"] == 16 * 4 * 64
    assert s["targets"] == 35  # 5 layers x (q, k, v, o, gate, up, down): every k-bit linear
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5, s
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 8, 16]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in log if "loss" in r)
    assert log[1]["lr"] == pytest.approx(5e-3 / 2)  # warmup of 2 steps, then constant
    with open(os.path.join(out, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    run = json.load(open(os.path.join(out, "finetune_run.json")))
    assert run["status"] == "done"


def test_adapter_files_have_peft_names_and_shapes(trained):
    _, out = trained
    config, pairs = read_adapter(out)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert len(pairs) == 35
    a, b = pairs["model.layers.0.mlp.down_proj"]
    assert a.shape == (4, 172) and b.shape == (64, 4) and a.dtype == b.dtype == torch.float32
    assert b.abs().max() > 0  # B starts at zero; training moved it
    from safetensors import safe_open

    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as fh:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in fh.keys()


def test_peft_on_decoded_model_gives_kbit_lora_logits(nf4, trained, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, out = trained
    dense = str(tmp_path / "decoded")
    decode(nf4, dense, "fp32")
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), out).eval()

    model, tok = load_model(nf4, dtype="fp32")
    ids = torch.tensor([tok(SNIPPET)["input_ids"][:48]])
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        loras = apply_adapter(model, out)
        ours = model(input_ids=ids).logits
        theirs = ref(input_ids=ids).logits
    assert all(isinstance(lo.base, KbitLinear) for lo in loras.values())
    diff = (ours - theirs).abs().max().item()
    effect = (ours - base_logits).abs().max().item()
    print(f"max |kbit+LoRA - peft(decoded)| logit difference: {diff:.3g} (adapter moves logits by {effect:.3g})")
    assert effect > 0.1  # the comparison is not between two unadapted models
    assert diff < 1e-4


def test_merge_kbit_reencodes_with_the_base_plan_and_scores(nf4, trained, texts):
    s, out = trained
    merged = os.path.join(out, "merged-kbit")
    m = s["merged"]["kbit"]
    assert m["path"] == merged and m["merged"] == 35
    base_man = json.load(open(os.path.join(nf4, MANIFEST)))
    man = json.load(open(os.path.join(merged, MANIFEST)))
    plan = {t["name"]: t for t in base_man["tensors"]}
    for t in man["tensors"]:  # same tensors quantized, each with the base's own settings
        b = plan[t["name"]]
        assert t["quantized"] == b["quantized"]
        if t["quantized"]:
            keys = ("bits", "block_size", "data_type", "double_quant", "scale_dtype", "scale_search")
            assert [t[k] for k in keys] == [b[k] for k in keys]
    lin = man["lineage"][-1]
    assert lin["merge"] == "kbit" and lin["steps"] == 16 and lin["base"]["path"] == os.path.abspath(nf4)
    assert lin["base"]["files"] and lin["adapter"]["sha256"]
    # merged and re-quantized: close to the unmerged adapter's loss, far below the base's
    print(f"eval loss: base {s['eval_loss_before']:.4f}, kbit+LoRA {s['eval_loss_after']:.4f}, "
          f"merged kbit {m['eval_loss']:.4f}")
    assert abs(m["eval_loss"] - s["eval_loss_after"]) < 0.25
    assert m["eval_loss"] < s["eval_loss_before"] - 0.5
    model, tok = load_model(merged, dtype="fp32")
    assert sum(isinstance(x, KbitLinear) for x in model.modules()) == 35


def test_merge_dense_equals_peft_merge(nf4, trained, texts, tmp_path):
    s, out = trained
    dst = str(tmp_path / "merged-dense")
    r = merge(nf4, out, dst, "dense", training={"steps": 16})
    assert r["merged"] == 35
    assert json.load(open(os.path.join(dst, MANIFEST)))["lineage"][-1]["merge"] == "dense"
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dst).eval()
    model, tok = load_model(nf4, dtype="fp32")
    apply_adapter(model, out)
    ids = torch.tensor([tok(SNIPPET)["input_ids"][:48]])
    with torch.no_grad():
        diff = (dense(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-3
    blocks = load_blocks(texts[1], tok, 64)
    assert train.evaluate(dense, blocks, 4) == pytest.approx(s["eval_loss_after"], abs=1e-3)


def test_lora_backward_through_kbit_base_matches_dense(nf4):
    """FrozenKbitMatmul's input gradient (dequantized again in backward) equals nn.Linear's on the same weight."""
    model, _ = load_model(nf4, dtype="fp32")
    kb = model.get_submodule("model.layers.1.mlp.down_proj")
    dense = torch.nn.Linear(kb.in_features, kb.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(kb.dequantize_weight(torch.float32))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, kb.in_features, generator=gen)
    grads = []
    for base in (kb, dense):
        lo = LoraLinear(base, 4, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            lo.lora_B.normal_(generator=torch.Generator().manual_seed(2))
        xi = x.clone().requires_grad_(True)
        lo(xi).pow(2).sum().backward()
        grads.append((xi.grad, lo.lora_A.grad, lo.lora_B.grad))
    for g_k, g_d in zip(*grads):
        torch.testing.assert_close(g_k, g_d, rtol=1e-5, atol=1e-5)


def test_targets_pattern_and_rslora_scaling(nf4):
    model, _ = load_model(nf4, dtype="fp32")
    names = select_targets(model, ["re:.*(q|v)_proj"])
    assert len(names) == 10 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    loras = attach_lora(model, names, rank=16, alpha=32, rslora=True)
    assert loras[names[0]].scaling == pytest.approx(32 / 4)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert sum(p.requires_grad for p in model.parameters()) == 20


def test_merge_kbit_keeps_a_mixed_plan(stories_dir, tmp_path):
    """A base with per-tensor overrides (5-bit fp blocks of 32 on down_proj, int8 rows on q_proj, k_proj kept
    dense) is re-encoded tensor by tensor with those same settings, and the merged weights carry the delta."""
    from kbitcli.core.blockwise import sqnr_db
    from kbitcli.finetune.config import TrainConfig
    from kbitcli.finetune.peft_io import save_adapter
    from kbitcli.formats.kbit_format import KbitCheckpoint
    from kbitcli.recipes import Override

    base = str(tmp_path / "mixed")
    encode(stories_dir, base, Recipe(bits=4, block_size=64, dtype="nf", overrides=[
        Override("re:.*down_proj", {"bits": 5, "dtype": "fp", "block_size": 32}),
        Override("re:.*q_proj", {"bits": 8, "dtype": "int", "block_size": "row"}),
        Override("re:.*k_proj", {"skip": True})]))
    model, _ = load_model(base, dtype="fp32")
    loras = attach_lora(model, select_targets(model, ["re:.*(down|q)_proj"]), rank=4, alpha=8, seed=1)
    with torch.no_grad():
        for lo in loras.values():
            lo.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    adapter = str(tmp_path / "adapter")
    os.makedirs(adapter)
    save_adapter(adapter, loras, TrainConfig(rank=4, alpha=8), base)
    dst = str(tmp_path / "merged")
    merge(base, adapter, dst, "kbit")
    a, b = KbitCheckpoint(base), KbitCheckpoint(dst)
    assert a.names == b.names
    for n in a.names:
        assert a.meta[n] == b.meta[n] if a.meta[n] is None else \
            {k: v for k, v in a.meta[n].items() if k != "codebook"} == {k: v for k, v in b.meta[n].items() if k != "codebook"}
    name = "model.layers.2.mlp.down_proj"
    want = a.tensor(f"{name}.weight", torch.float32) + loras[name].delta_weight()
    got = b.tensor(f"{name}.weight", torch.float32)
    assert not torch.equal(got, a.tensor(f"{name}.weight", torch.float32))
    assert sqnr_db(want, got) > 20  # 5-bit fp, blocks of 32: the merged weight, re-quantized
