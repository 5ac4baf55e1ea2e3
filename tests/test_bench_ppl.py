"""kbit bench ppl on real models: stories260K on TinyStories (nll, KL, top-1) and MiniLM (cosine)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from kbitcli.bench import evaluate as ev
from kbitcli.bench.error import open_weights, simulated_quantization
from kbitcli.commands.app import app
from kbitcli.encode import encode
from kbitcli.models.load import load_model
from kbitcli.plan import make_plan
from kbitcli.recipes import Recipe

runner = CliRunner()
# stories260K on the bundled TinyStories text, stories split on <|endoftext|>, each BOS + tokens, context 512,
# measured with this code: 1.23641 nats/token over 22,237 tokens. The asset README's 1.2346 truncates the one
# story longer than 512 tokens instead of scoring its tail in a second window (22,130 tokens, 1.23457 here).
DENSE_NLL = 1.2364


def kbit(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def stories_ref(stories_dir, tinystories_text):
    dense, tok = load_model(stories_dir, dtype="fp32")
    windows, how = ev.causal_windows(tok, ev.read_text(tinystories_text), 512, 512)
    return ev.CausalReference(dense, windows), how


@pytest.fixture(scope="module")
def nf_sweep(stories_dir, stories_ref, tmp_path_factory):
    """The real k-bit path for k = 2..8 (nf, block 64): encode, load with k-bit layers, compare with dense."""
    ref, _ = stories_ref
    out = {}
    for k in range(2, 9):
        dst = tmp_path_factory.mktemp("nf") / f"k{k}"
        encode(stories_dir, str(dst), Recipe(bits=k, block_size=64, dtype="nf"))
        model, _ = load_model(str(dst), dtype="fp32", tokenizer=False)
        assert model.kbit_info["kbit_modules"], "the k-bit checkpoint must load as k-bit layers"
        out[k] = ref.compare(model)
    return out


def test_dense_nll_matches_the_published_measurement(stories_ref):
    ref, how = stories_ref
    assert how["mode"] == "documents" and how["documents"] == 70
    assert ref.tokens == 22237
    assert ref.baseline()["nll"] == pytest.approx(DENSE_NLL, abs=2e-4)
    assert ref.baseline()["nll"] == pytest.approx(1.2346, rel=0.005)


def test_nll_monotone_in_k_and_8bit_close_to_dense(stories_ref, nf_sweep):
    ref, _ = stories_ref
    dense = ref.baseline()["nll"]
    nll = [nf_sweep[k]["nll"] for k in range(2, 9)]
    assert all(b <= a for a, b in zip(nll, nll[1:])), nll
    assert nf_sweep[8]["nll"] == pytest.approx(dense, rel=0.005)
    assert nf_sweep[2]["nll"] > dense * 1.5  # 2 bits break a 260K-param model: the test can fail
    kl = [nf_sweep[k]["kl_divergence"] for k in range(2, 9)]
    top1 = [nf_sweep[k]["top1_agreement"] for k in range(2, 9)]
    assert all(x >= 0 for x in kl) and all(b < a for a, b in zip(kl, kl[1:])), kl
    assert all(0 <= t <= 1 for t in top1) and top1[-1] > 0.95 and top1[0] < top1[-1], top1


def test_delta_nll_and_its_standard_error(stories_dir, stories_ref, nf_sweep):
    """delta_nll = nll - dense nll; its standard error comes from the spread of the per-window differences
    (checked against a direct computation and a bootstrap), is 0 for the dense model against itself, and is
    small against the gap between k = 3 and k = 4 (so the k ordering above is not noise)."""
    ref, _ = stories_ref
    dense_nll = ref.baseline()["nll"]
    for k in (3, 4):
        r = nf_sweep[k]
        assert r["delta_nll"] == pytest.approx(r["nll"] - dense_nll, abs=1e-9)
        assert 0 < r["delta_nll_se"] < r["delta_nll"] / 4, r
    assert nf_sweep[3]["delta_nll"] - nf_sweep[4]["delta_nll"] > 5 * nf_sweep[3]["delta_nll_se"]
    model, _ = load_model(stories_dir, dtype="fp32", tokenizer=False)
    same = ref.compare(model, per_window=True)
    assert same["delta_nll"] == pytest.approx(0, abs=1e-9) and same["delta_nll_se"] == pytest.approx(0, abs=1e-9)
    # a direct computation over the windows, and a bootstrap of windows, for the nf3 model
    reader = open_weights(stories_dir)
    plan = make_plan(reader.names_infos, Recipe(bits=3, block_size=64, dtype="nf"))
    with simulated_quantization(model, reader, plan):
        r = ref.compare(model, per_window=True)
    d = torch.tensor(r["window_delta_nll"], dtype=torch.float64)
    n = torch.tensor(ref.window_tokens, dtype=torch.float64)
    assert len(d) == len(n) > 50 and int(n.sum()) == ref.tokens
    assert float(d.sum() / n.sum()) == pytest.approx(r["delta_nll"], rel=1e-9)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(d), (2000, len(d)), generator=g)
    boot = d[idx].sum(1) / n[idx].sum(1)
    assert float(boot.std()) == pytest.approx(r["delta_nll_se"], rel=0.15)


def test_simulated_quantization_equals_kbit_forward(stories_dir, stories_ref, nf_sweep):
    """The scaling study's shortcut (dense model, dequantized weights) gives the k-bit layers' numbers."""
    ref, _ = stories_ref
    dense, _ = load_model(stories_dir, dtype="fp32", tokenizer=False)
    reader = open_weights(stories_dir)
    plan = make_plan(reader.names_infos, Recipe(bits=4, block_size=64, dtype="nf"))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    with simulated_quantization(dense, reader, plan):
        sim = ref.compare(dense)
    assert sim["nll"] == pytest.approx(nf_sweep[4]["nll"], abs=1e-5)
    assert sim["kl_divergence"] == pytest.approx(nf_sweep[4]["kl_divergence"], abs=1e-5)
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the dense weights are back on exit


def test_cli_json_keys(stories_dir, tinystories_text):
    r = kbit("bench", "ppl", stories_dir, "--text", tinystories_text, "-k", "4", "--max-tokens", "1500", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["context"] == 512 and res["tokens"] <= 1500 and res["tokens"] > 1400
    assert "stories260K" in res["tokenizer"] and "512" in res["tokenizer"]
    assert res["evaluation"] == "kbit" and res["baseline"]["source"] == "dense"
    q = res["quantized"]
    for key in ("nll", "ppl", "bits_per_param", "kl_divergence", "top1_agreement", "delta_nll", "delta_nll_se"):
        assert isinstance(q[key], float), key
    assert "window_delta_nll" not in q  # per-window values only when asked for (benchmarks)
    assert q["bits_per_param"] == pytest.approx(4.25)
    assert q["nll"] > res["baseline"]["nll"] and 0 < q["kl_divergence"] and 0 < q["top1_agreement"] < 1


def test_kbit_checkpoint_is_compared_with_its_decoded_weights(stories_dir, tinystories_text, tmp_path):
    dst = tmp_path / "nf3"
    encode(stories_dir, str(dst), Recipe(bits=3, block_size=64, dtype="nf"))
    r = kbit("bench", "ppl", dst, "--text", tinystories_text, "--max-tokens", "800", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["baseline"]["source"] == "decoded" and "decode" in res["baseline"]["note"]
    # k-bit layers vs the same weights decoded: only float rounding separates them
    assert res["quantized"]["kl_divergence"] < 1e-6 and res["quantized"]["top1_agreement"] > 0.999
    assert res["quantized"]["bits_per_param"] == pytest.approx(3.25)
    bad = kbit("bench", "ppl", dst, "--text", tinystories_text, "-k", "4")
    assert bad.exit_code == 2 and "already a k-bit checkpoint" in bad.output


def test_minilm_cosine_grows_with_k(minilm_dir, tinystories_text):
    cos = {}
    for k in (3, 8):  # a slice of MiniLM (its first two layers) keeps the test fast; the report has the full model
        r = kbit("bench", "ppl", minilm_dir, "--text", tinystories_text, "-k", k, "--max-lines", "24",
                 "--targets", "re:encoder\\.layer\\.[01]\\..*", "--json")
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["kind"] == "encoder" and res["lines"] == 24
        cos[k] = res["quantized"]
    assert cos[8]["cosine_mean"] > cos[3]["cosine_mean"]
    assert cos[8]["cosine_min"] > 0.999 and cos[3]["cosine_min"] <= cos[3]["cosine_mean"] <= 1


@pytest.mark.parametrize("length, context, stride", [(1000, 512, 512), (1000, 512, 100), (513, 512, 1), (7, 512, 3),
                                                     (2, 2, 1)])
def test_sliding_windows_score_every_token_once(length, context, stride):
    ids = list(range(length))
    windows = ev._windows(ids, context, stride)
    scored = [w.ids[j] for w in windows for j in range(w.score_from, len(w.ids))]
    assert all(len(w.ids) <= context for w in windows)
    if stride < context:
        assert scored == ids[1:]  # every target once, in order
    else:
        # no overlap: the first token of each later window has no context and is not scored (as in HF's recipe)
        assert scored == [i for i in ids[1:] if i % context != 0]


def test_split_modes(stories_dir, tinystories_text):
    _, tok = load_model(stories_dir, tokenizer=True)
    text = ev.read_text(tinystories_text)
    docs, how = ev.causal_windows(tok, text, 512, 512, "auto")
    stream, how2 = ev.causal_windows(tok, text, 512, 256, "none")
    assert how["separator"] == "<|endoftext|>" and how2["mode"] == "stream"
    assert sum(w.scored for w in stream) == len(tok(text, add_special_tokens=False)["input_ids"])  # BOS + all
    capped, _ = ev.causal_windows(tok, text, 512, 512, "auto", max_tokens=700)
    assert 690 <= sum(w.scored for w in capped) <= 700


@pytest.mark.parametrize("args, words", [
    (["--text", "{missing}"], "text file not found"),
    (["--text", "{empty}"], "empty"),
    (["--text", "{text}", "--context", "1"], "at least 2"),
    (["--text", "{text}", "--context", "4096"], "longer than the model's 512"),
    (["--text", "{text}", "--stride", "0"], "--stride"),
    (["--text", "{text}", "-k", "9"], "bits"),
])
def test_bad_input_is_one_line_exit_2(stories_dir, tinystories_text, tmp_path, args, words):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    fill = {"missing": tmp_path / "nope.txt", "empty": empty, "text": tinystories_text}
    r = kbit("bench", "ppl", stories_dir, *[a.format(**fill) for a in args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kbit: error:") and words in lines[0], r.output


def test_model_must_be_a_folder(tinystories_text, tmp_path):
    r = kbit("bench", "ppl", tmp_path / "nothing", "--text", tinystories_text)
    assert r.exit_code == 2
    assert os.path.basename(str(tmp_path / "nothing")) in r.output
