"""Calibration-aware quantization (GPTQ, importance-weighted RTN) on the real stories260K and MiniLM.

Quality is judged on the model's own loss: the calibrated checkpoints must lose fewer nats than
round-to-nearest on held-out text (calibration on one half of the bundled TinyStories text, scoring on the
other half), and the files must stay the same format (the spec's reference decoder reads them bit-exactly).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kbit_cli import assert_bad_input, cli
from kbitcli.calibration.data import Calibration
from kbitcli.core.blockwise import Spec, dequantize, quantize
from kbitcli.core.kbit_grid import quantize_gptq, quantize_weighted
from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.recipes import Recipe


@pytest.fixture(scope="module")
def halves(calib_halves):
    return calib_halves


def _nll(model_dir: str, dense_dir: str, text: str) -> float:
    from kbitcli.bench import evaluate as ev
    from kbitcli.models.load import load_model

    dense, tok = load_model(dense_dir, dtype="fp32")
    model, _ = load_model(model_dir, dtype="fp32", tokenizer=False)
    windows, _ = ev.causal_windows(tok, ev.read_text(text), 512, 512, "auto", 6000)
    return ev.CausalReference(dense, windows).compare(model)["nll"]


@pytest.mark.parametrize("dtype", ["nf", "fp", "int", "quantile", "dynamic"])
@pytest.mark.parametrize("scales", ["fp32", "fp16", "dq"])
def test_gptq_without_correlation_is_round_to_nearest(stories_dir, dtype, scales):
    """With H = I no error is spread, so GPTQ must give round-to-nearest's codes and scales, on real weights,
    for rows that are and are not a multiple of the block (FFN 172 with B = 64): exactly the plain encoder's
    with fp32 or double-quantized scales. With fp16 scales the calibrated grid stores each scale rounded up and
    codes against it, the plain encoder codes against the fp32 absmax and stores it rounded to nearest
    (bitsandbytes' codes; blockwise.quantize): the two differ only for weights within one fp16 rounding of a
    code boundary."""
    from safetensors.torch import load_file

    from kbitcli.core.blockwise import round_up
    from kbitcli.core.pack import unpack_u8

    w = load_file(os.path.join(stories_dir, "model.safetensors"))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        for k in (3, 4):
            spec = Spec(k, 64, dtype, scales == "dq", "fp32" if scales == "fp32" else "fp16", 1)
            a = quantize(w[name], spec, name)
            b = quantize_gptq(w[name], spec, name, torch.eye(w[name].shape[1]), refit=False)
            c = quantize_weighted(w[name], spec, name, None, 1)
            assert torch.equal(b.codes, c.codes) and torch.equal(b.scales, c.scales), (name, k)
            if scales != "fp16":
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), (name, k)
                continue
            absmax = quantize(w[name], Spec(k, 64, dtype, False, "fp32", 1), name).scales
            assert torch.equal(a.scales, absmax.half()) and torch.equal(b.scales, round_up(absmax, torch.float16))
            n = w[name].numel()
            differ = (unpack_u8(a.codes, k, n) != unpack_u8(b.codes, k, n)).float().mean().item()
            assert differ < 0.003, (name, k, differ)


def test_gptq_lowers_output_error_on_real_weights(stories_dir):
    """On a real weight and inputs with correlated channels, GPTQ's layer-output error is below RTN's, and
    importance-weighted scales lower it too; each result decodes through the ordinary decoder."""
    from safetensors.torch import load_file

    w = load_file(os.path.join(stories_dir, "model.safetensors"))["model.layers.2.mlp.up_proj.weight"]
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    X = torch.randn(4096, 64, generator=g) @ mix * torch.linspace(0.2, 3, 64)
    H = 2 * X.T @ X / X.shape[0]
    spec = Spec(3, 64, "nf", False, "fp16", 1)

    def out_err(qt):
        return ((X @ (w - dequantize(qt)).T) ** 2).mean().item()

    rtn = out_err(quantize(w, spec))
    gptq = out_err(quantize_gptq(w, spec, "w", H))
    # refitting the scales (row-aligned blocks) never raises the output error GPTQ reached
    assert gptq <= out_err(quantize_gptq(w, spec, "w", H, refit=False)) * 1.001
    weighted = out_err(quantize_weighted(w, Spec(3, 64, "nf", False, "fp16", 8), "w", torch.diagonal(H), 8))
    assert gptq < 0.9 * rtn, (gptq, rtn)
    assert weighted < rtn, (weighted, rtn)


@pytest.mark.parametrize("bits", [3, 4])
def test_calibrated_encodes_lose_fewer_nats(stories_dir, halves, tmp_path, bits):
    """The model's own loss on text calibration never saw: gptq < rtn + calib < data-free rtn (k = 3),
    and gptq < data-free rtn at k = 4. The checkpoints are the native format: the reference decoder reads them."""
    from reference_decoder import decode as reference_decode

    calib, held_out = halves
    c = Calibration(calib, tokens=4096)
    paths = {}
    for label, recipe, cal in (("rtn", Recipe(bits=bits), None), ("rtn-calib", Recipe(bits=bits), c),
                               ("gptq", Recipe(bits=bits, method="gptq"), c)):
        paths[label] = str(tmp_path / label)
        encode(stories_dir, paths[label], recipe, calib=cal)
    nll = {k: _nll(p, stories_dir, held_out) for k, p in paths.items()}
    assert nll["gptq"] < nll["rtn"], nll
    if bits == 3:
        assert nll["rtn-calib"] < nll["rtn"], nll
    # same format: the spec's decoder gives the same weights as kbit's own
    from kbitcli.formats.kbit_format import KbitCheckpoint

    ref = reference_decode(paths["gptq"], "fp32")
    ck = KbitCheckpoint(paths["gptq"])
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.4.self_attn.q_proj.weight"):
        assert torch.equal(torch.from_numpy(ref[name][1].copy()), ck.tensor(name, torch.float32)), name


def test_manifest_records_calibration_and_sample_is_seeded(stories_dir, halves, tmp_path):
    calib, _ = halves
    outs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        dst = str(tmp_path / label)
        r = cli("encode", stories_dir, dst, "--method", "gptq", "--calib", calib, "--calib-tokens", "1024",
                "--seed", str(seed), "--json", "--quiet")
        assert r.code == 0, r.stderr
        outs[label] = open(os.path.join(dst, "model.safetensors"), "rb").read()
    man = json.load(open(tmp_path / "a" / "kbit_manifest.json"))
    rec = man["calibration"]
    import hashlib

    assert rec["sha256"] == hashlib.sha256(open(calib, "rb").read()).hexdigest()
    assert (rec["tokens_used"], rec["seed"], rec["damp"], rec["calibrated_tensors"]) == (1024, 0, 0.01, 35)
    assert rec["act_order"] is True and rec["true_sequential"] is True  # the defaults
    assert all(t["method"] == "gptq" for t in man["tensors"] if t["quantized"])
    assert json.load(open(tmp_path / "a" / "config.json"))["quantization_config"]["method"] == "gptq"
    assert outs["a"] == outs["b"]  # a pure function of file, tokens and seed
    assert outs["a"] != outs["c"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no spill or temp left beside DST


def test_per_tensor_method_override_and_jsonl(stories_dir, tmp_path, halves):
    calib, _ = halves
    jl = tmp_path / "calib.jsonl"
    with open(calib, encoding="utf-8") as fh:
        jl.write_text("\n".join(json.dumps({"text": s}) for s in fh.read().split("<|endoftext|>") if s.strip()))
    dst = str(tmp_path / "o")
    r = cli("encode", stories_dir, dst, "--calib", str(jl), "--calib-tokens", "1024",
            "--override", "re:.*down_proj=method:gptq", "--json", "--quiet")
    assert r.code == 0, r.stderr
    plan = {t["name"]: t for t in json.loads(r.stdout)["plan"] if t["quantized"]}
    assert plan["model.layers.0.mlp.down_proj.weight"]["method"] == "gptq"
    assert plan["model.layers.0.mlp.up_proj.weight"]["method"] == "rtn"
    assert plan["model.layers.0.mlp.up_proj.weight"]["scale_search"] == 8  # importance-weighted with --calib


def test_encoder_calibrates_too(minilm_dir, halves, tmp_path):
    """BERT's encoder layers are the blocks; GPTQ runs on MiniLM and the result loads."""
    calib, _ = halves
    dst = str(tmp_path / "m")
    r = cli("encode", minilm_dir, dst, "--bits", "4", "--method", "gptq", "--calib", calib, "--calib-tokens", "512",
            "--json", "--quiet")
    assert r.code == 0, r.stderr
    rec = json.loads(r.stdout)["calibration"]
    assert rec["calibrated_tensors"] == 36 and rec["uncalibrated"] == ["pooler.dense.weight"]


def test_bench_ppl_baseline_scores_a_finished_checkpoint(stories_dir, tinystories_text, tmp_path):
    dst = str(tmp_path / "q")
    encode(stories_dir, dst, Recipe(bits=3))
    own = cli("bench", "ppl", dst, "--text", tinystories_text, "--max-tokens", "2000", "--json", "--quiet")
    vs = cli("bench", "ppl", dst, "--text", tinystories_text, "--max-tokens", "2000", "--baseline", stories_dir,
             "--json", "--quiet")
    assert own.code == 0 and vs.code == 0, (own.stderr, vs.stderr)
    own, vs = json.loads(own.stdout), json.loads(vs.stdout)
    assert own["quantized"]["kl_divergence"] < 1e-6  # against its own decoded weights: nothing to see
    assert vs["quantized"]["kl_divergence"] > 0.1 and vs["quantized"]["top1_agreement"] < 0.9
    assert vs["baseline"]["nll"] < vs["quantized"]["nll"]
    # --baseline is for a finished checkpoint, and must itself be the dense original
    assert_bad_input(cli("bench", "ppl", stories_dir, "--text", tinystories_text, "--baseline", stories_dir), "--baseline")
    assert_bad_input(cli("bench", "ppl", dst, "--text", tinystories_text, "--baseline", dst), "--baseline")


def test_coordinate_descent_never_raises_output_error(stories_dir):
    """The sweep after GPTQ only takes moves that lower the layer's output error, so every row's error is at
    most GPTQ's own and the total is lower: kbit's nf3 grid on a row-aligned and a ragged weight (rows of 172,
    blocks of 64 spanning two rows), and GGUF's Q4_1 grid, whose blocks carry an offset."""
    from safetensors.torch import load_file

    from kbitcli.core.gptq import gptq
    from kbitcli.formats import gguf_grid

    w = load_file(os.path.join(stories_dir, "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name, grid_of in (("model.layers.2.mlp.up_proj.weight", None), ("model.layers.2.mlp.down_proj.weight", None),
                          ("model.layers.2.mlp.up_proj.weight", "Q4_1")):
        W = w[name].float()
        cols = W.shape[1]
        X = torch.randn(2048, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / 8 + torch.eye(cols))
        H = 2 * X.T @ X / X.shape[0]
        if grid_of is None:
            from kbitcli.core.kbit_grid import KbitGrid

            grid, block = KbitGrid(W, Spec(3, 64, "nf", False, "fp16", 1), name, 1).grid, 64
        else:
            grid, block = gguf_grid.grid(grid_of, 1), 32
        Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(cols)  # the dampened H both passes minimise
        errs = []
        for refine in (0, 1):
            codes, scale, offset = gptq(W, H, block, grid, refit=False, refine=refine)
            nb = scale.numel()
            q = grid.values(codes.view(nb, block) if W.numel() % block == 0 else codes, scale[:, None], offset)
            R = W - q.reshape(W.shape)
            errs.append(((R @ Hd) * R).sum(1))
        assert (errs[1] <= errs[0] * (1 + 1e-5) + 1e-6).all(), name
        assert errs[1].sum() < 0.99 * errs[0].sum(), (name, errs[1].sum(), errs[0].sum())


def test_calibration_bad_input(stories_dir, halves, tmp_path):
    calib, _ = halves
    dst = str(tmp_path / "x")
    weights = os.path.join(stories_dir, "model.safetensors")
    assert_bad_input(cli("encode", weights, dst, "--method", "gptq", "--calib", calib), "--method rtn", dst=dst)
    assert_bad_input(cli("encode", stories_dir, dst, "--method", "gptq"), "--calib", dst=dst)
    assert_bad_input(cli("encode", stories_dir, dst, "--calib", str(tmp_path / "nope.txt")), "not found", dst=dst)
    assert_bad_input(cli("encode", stories_dir, dst, "--calib-tokens", "100"), "--calib", dst=dst)
    assert_bad_input(cli("encode", stories_dir, dst, "--no-act-order"), "--calib", dst=dst)
    assert_bad_input(cli("encode", stories_dir, dst, "--calib", calib, "--calib-tokens", "8"), "--calib-tokens", dst=dst)
    for damp in ("0", "2", "nan"):
        assert_bad_input(cli("encode", stories_dir, dst, "--calib", calib, "--damp", damp), "--damp", dst=dst)
    for refine in (-1, 9, 1.5, True):  # Python API only: coordinate-descent sweeps 0..8
        with pytest.raises(KbitError) as e:
            encode(stories_dir, dst, Recipe(method="gptq"), calib=Calibration(calib, 1024, refine=refine))
        assert e.value.exit_code == 2 and "refine" in str(e.value) and not os.path.exists(dst)
    assert_bad_input(cli("encode", stories_dir, calib, "--calib", calib, "--force"), "--calib")  # DST = the text
    assert_bad_input(cli("encode", stories_dir, dst, "--method", "awq"), "method", dst=dst)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    assert_bad_input(cli("encode", stories_dir, dst, "--calib", str(short)), "--calib-tokens", dst=dst)
    # a model folder without a tokenizer cannot read the calibration text
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes(open(os.path.join(stories_dir, f), "rb").read())
    assert_bad_input(cli("encode", str(bare), dst, "--method", "gptq", "--calib", calib), "tokenizer", dst=dst)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".kbit")] == []


def test_asymmetric_calibration_serves_both_methods(stories_dir, halves, tmp_path):
    """Calibration(asymmetric=True) (API only) gathers X_q^T X_q and X_q^T X_fp; importance-weighted RTN
    tensors take the diagonal of the former, GPTQ tensors the least-squares target."""
    calib, _ = halves
    r = encode(stories_dir, str(tmp_path / "a"), Recipe(), calib=Calibration(calib, tokens=1024, asymmetric=True))
    g = encode(stories_dir, str(tmp_path / "g"), Recipe(method="gptq"), calib=Calibration(calib, tokens=1024, asymmetric=True))
    assert r["calibration"]["asymmetric"] and r["calibration"]["calibrated_tensors"] == 35
    assert g["calibration"]["calibrated_tensors"] == 35


def test_weighted_refit_never_raises_the_weighted_error(stories_dir):
    """Calibrated RTN: the weighted least-squares refit after the candidate search (grid.refit) keeps a block's
    new scale only where its importance-weighted error falls, so per block it is never worse, and on real
    weights it is better in total; scale_search 1 (one candidate) stays plain absmax."""
    from safetensors import safe_open

    from kbitcli.core.blockwise import Spec
    from kbitcli.core.gptq import rtn
    from kbitcli.core.kbit_grid import KbitGrid

    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")  # 64 x 172: blocks run across rows
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) ** 4 + 1e-3
    for spec, candidates in ((Spec(4, 64, "nf"), 8), (Spec(3, 64, "int", True), 8), (Spec(4, 64, "nf"), 1)):
        g = KbitGrid(w, spec, "w", candidates)
        errors = []
        for refit in (False, True):
            codes, scale, _ = rtn(w, spec.block_size, g.grid, importance, refit=refit)
            q = g.grid.levels[codes] * scale.repeat_interleave(spec.block_size)[: w.numel()]
            e = (q - w.reshape(-1)).pow(2) * importance.repeat(w.shape[0])
            errors.append(torch.cat([e, e.new_zeros(-e.numel() % 64)]).view(-1, 64).sum(1))
        if candidates == 1:
            assert torch.equal(errors[0], errors[1])
        else:
            assert torch.all(errors[1] <= errors[0]) and errors[1].sum() < errors[0].sum() * 0.99
