"""Calibrated foreign exports: `kbit encode --format bnb|gguf --method gptq|rtn --calib FILE`.

The codes the calibration run chose (GPTQ / importance-weighted RTN on the format's own grid) must be the ones
in the file: bitsandbytes and gguf-py decode the file to exactly the weights the calibration forward used, the
engines (transformers + bitsandbytes, transformers' GGUF loader) agree with kbit's reader, and the calibrated
files lose fewer nats on held-out text than the data-free export of the same format. stories260K, calibration on
one half of the bundled TinyStories text, scoring on the other half.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kbit_cli import assert_bad_input, cli
from kbitcli.calibration.data import Calibration
from kbitcli.core.gptq import gptq, rtn
from kbitcli.decode import decode
from kbitcli.encode import encode
from kbitcli.formats import bnb, gguf_grid
from kbitcli.formats.registry import open_reader as open_foreign
from kbitcli.formats.gguf_reader import unpermute
from kbitcli.formats.source import open_source
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.recipes import Override, Recipe, parse_override
from interop_fixtures import bnb_generic_path, logits

gguf = pytest.importorskip("gguf")
SKIP_DOWN = parse_override("model.layers.*.mlp.down_proj=skip")  # GGUF rows of 172 stay F32
GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}
TOKENS = 2048


@pytest.fixture(scope="module")
def halves(calib_halves):
    return calib_halves


@pytest.fixture(scope="module")
def calib(halves):
    return Calibration(halves[0], tokens=TOKENS)


@pytest.fixture(scope="module")
def scorer(stories_dir, halves):
    """nll(model) on 4096 held-out tokens (the dense model's nll is scorer.baseline())."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitcli.bench import evaluate as ev

    dense = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    windows, _ = ev.causal_windows(AutoTokenizer.from_pretrained(stories_dir), ev.read_text(halves[1]), 512, 512,
                                   "auto", 4096)
    return ev.CausalReference(dense, windows)


def nll(scorer, model) -> float:
    return scorer.compare(model)["nll"]


def reader_model(path: str, stories_dir: str | None = None):
    """A transformers Llama holding the weights kbit's reader decodes from a bnb folder or a GGUF file."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    r = open_foreign(path)
    model = (AutoModelForCausalLM.from_pretrained(stories_dir) if stories_dir else
             LlamaForCausalLM(LlamaConfig(**r.config))).eval()
    missing, unexpected = model.load_state_dict({n: r.tensor(n, torch.float32) for n in r.names}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def recording(monkeypatch, module, attr: str) -> dict:
    """Wrap a calibrated quantizer: name -> the dequantized weight the calibration forward continued with."""
    seen, orig = {}, getattr(module, attr)

    def wrapper(w, *args, **kw):
        parts, wq = orig(w, *args, **kw)
        name = args[0].name if attr == "calibrated_4bit" else kw["name"]
        seen[name] = wq.clone()
        return parts, wq

    monkeypatch.setattr(module, attr, wrapper)
    return seen


# ---- GGUF grid and packer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(GGUF_BITS))
def test_gguf_packer_bytes_decode_to_the_grid_values(qtype):
    """Random codes/scales, and RTN / GPTQ results on random weights: gguf-py's dequantize of the packed bytes
    equals the grid's values bit for bit (sign convention of Q4_0/Q5_0, Q5's high bits, Q8_0's int8)."""
    g = gguf.GGMLQuantizationType[qtype]
    torch.manual_seed(0)
    levels = gguf_grid.grid(qtype).levels
    has_m = qtype in ("Q4_1", "Q5_1")
    codes = torch.randint(0, len(levels), (257, 32))
    d = (torch.randn(257) * 0.1).half().float()
    m = (torch.randn(257) * 0.1).half().float() if has_m else None
    data = gguf_grid.pack_blocks(qtype, codes, d, m)
    assert data.shape == (257, gguf.GGML_QUANT_SIZES[g][1])
    assert np.array_equal(gguf.quants.dequantize(data, g), gguf_grid.values(qtype, codes, d, m).numpy())

    w = torch.randn(64, 128) * torch.rand(64, 1) * 3
    w[0, :32] = 0  # an all-zero block: d = 0
    x = torch.randn(512, 128)
    H = x.t() @ x
    for c, s, o in (rtn(w, 32, gguf_grid.grid(qtype, 4), H.diagonal() / 512),
                    gptq(w, H / 512 * 2, 32, gguf_grid.grid(qtype, 1))):
        data = gguf_grid.pack_blocks(qtype, c.view(-1, 32), s, o)
        back = gguf.quants.dequantize(data, g).reshape(w.shape)
        assert np.array_equal(back, gguf_grid.values(qtype, c, s, o).view(w.shape).numpy())
        assert ((torch.from_numpy(back) - w).pow(2).mean() < w.pow(2).mean() / 10).item()


def test_gguf_grid_round_to_nearest_matches_llama_cpp_rounding():
    """One candidate, no importance: as good as llama.cpp's quantizer (gguf.quants.quantize). The values differ
    only where its unrounded d (1/d, and the _1 types' d = (max - min) / 15 before m is rounded) moves a value
    across a rounding boundary or changes d's last fp16 bit; kbit rounds against the stored d and m."""
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    x = w.numpy().reshape(-1)
    for qtype in GGUF_BITS:
        g = gguf.GGMLQuantizationType[qtype]
        c, s, o = rtn(w, 32, gguf_grid.grid(qtype))
        ours = gguf.quants.dequantize(gguf_grid.pack_blocks(qtype, c.view(-1, 32), s, o), g).reshape(-1)
        ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), g), g).reshape(-1)
        assert ((ours - x) ** 2).mean() <= ((ref - x) ** 2).mean() * (1 + 1e-4), qtype
        assert (ours == ref).mean() > (0.99 if qtype in ("Q4_0", "Q5_0", "Q8_0") else 0.85), qtype


# ---- GGUF exports ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(GGUF_BITS))
def test_gguf_gptq_export_holds_the_calibrated_codes(stories_dir, calib, tmp_path, monkeypatch, qtype):
    """gguf-py (GGUFReader + dequantize, q/k rows un-permuted) gives exactly the weights GPTQ's forward used,
    for every calibrated tensor; kbit's decode of the file equals gguf-py's readback."""
    seen = recording(monkeypatch, gguf_grid, "quantize")
    dst = str(tmp_path / f"s-{qtype}.gguf")
    r = encode(stories_dir, dst, Recipe(bits=GGUF_BITS[qtype], block_size=32, dtype="int", method="gptq",
                                        overrides=[SKIP_DOWN]), fmt="gguf", gguf_type=qtype, calib=calib)
    assert r["calibration"]["calibrated_tensors"] == 30 == len(seen)  # q k v o gate up, 5 layers (down skipped)
    reader = gguf.GGUFReader(dst)
    ck = open_foreign(dst)
    gname = {v.name: k for k, v in ck.tensors.items()}
    for t in reader.tensors:
        hf = gname[t.name]
        back = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(ck.shape(hf))
        if t.name.endswith("attn_q.weight"):
            back = unpermute(back, ck.n_head)
        elif t.name.endswith("attn_k.weight"):
            back = unpermute(back, ck.n_head_kv)
        assert torch.equal(back, ck.tensor(hf, torch.float32)), t.name
        if hf in seen:
            assert t.tensor_type == gguf.GGMLQuantizationType[qtype]
            assert torch.equal(back, seen[hf]), t.name


def test_gguf_gptq_q4_0_beats_rtn_and_engines_agree(stories_dir, calib, scorer, tmp_path):
    """GPTQ Q4_0 vs the data-free Q4_0 (llama.cpp's rounding): different blocks, fewer nats lost; transformers'
    GGUF loader, kbit's reader and `kbit decode` give the same logits."""
    from transformers import AutoModelForCausalLM

    encode(stories_dir, str(tmp_path / "rtn.gguf"), Recipe(bits=4, block_size=32, dtype="int", overrides=[SKIP_DOWN]),
           fmt="gguf", gguf_type="Q4_0")
    encode(stories_dir, str(tmp_path / "gptq.gguf"), Recipe(bits=4, block_size=32, dtype="int", method="gptq",
                                                            overrides=[SKIP_DOWN]), fmt="gguf", gguf_type="Q4_0",
           calib=calib)
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "rtn.gguf")).tensors}
    b = {t.name: (np.array(t.data), t.tensor_type) for t in gguf.GGUFReader(str(tmp_path / "gptq.gguf")).tensors}
    for name, (data, kind) in b.items():
        if kind == gguf.GGMLQuantizationType.Q4_0:
            assert not np.array_equal(data, a[name]), name  # every calibrated tensor's blocks changed
        else:
            assert np.array_equal(data, a[name]), name  # dense tensors as stored
    ours = reader_model(str(tmp_path / "gptq.gguf"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="gptq.gguf")
    assert (logits(ours) - logits(theirs)).abs().max().item() < 1e-5
    decode(str(tmp_path / "gptq.gguf"), str(tmp_path / "dense"), "fp32")
    assert (logits(ours) - logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")))).abs().max() < 1e-5
    base = scorer.baseline()["nll"]
    n_rtn, n_gptq = nll(scorer, reader_model(str(tmp_path / "rtn.gguf"))), nll(scorer, ours)
    print(f"Q4_0 dNLL vs dense: rtn {n_rtn - base:.4f}, gptq {n_gptq - base:.4f}")
    assert n_gptq < n_rtn - 0.005, (n_gptq, n_rtn)
    man = json.load(open(tmp_path / "gptq.gguf.manifest.json"))
    assert man["calibration"]["calibrated_tensors"] == 30 and man["calibration"]["tokens_used"] == TOKENS
    assert json.load(open(tmp_path / "rtn.gguf.manifest.json"))["calibration"] is None


def test_gguf_rtn_with_calib_via_cli(stories_dir, halves, tmp_path, monkeypatch):
    """`--method rtn --calib`: importance-weighted scale search (8 candidates by default, which the data-free
    GGUF export refuses) on Q5_1's grid; the file holds the calibrated blocks and the manifest the run."""
    seen = recording(monkeypatch, gguf_grid, "quantize")
    dst = str(tmp_path / "s.gguf")
    r = cli("encode", stories_dir, dst, "--format", "gguf", "--gguf-type", "Q5_1", "--method", "rtn", "--calib",
            halves[0], "--calib-tokens", "1024", "--override", "model.layers.*.mlp.down_proj=skip", "--quiet")
    assert r.code == 0, r.stderr
    man = json.load(open(dst + ".manifest.json"))
    assert man["calibration"]["tokens_used"] == 1024 and man["calibration"]["calibrated_tensors"] == 30
    emb = next(t for t in man["tensors"] if t["name"] == "model.embed_tokens.weight")  # the GGUF default, Q8_0:
    assert emb["rule"].startswith("gguf default") and emb["scale_search"] == 1  # llama.cpp's rounding
    assert {t["scale_search"] for t in man["tensors"] if t["quantized"] and t is not emb} == {8}
    ck = open_foreign(dst)
    src = open_source(stories_dir)
    changed = 0
    for name, wq in seen.items():
        assert torch.equal(ck.tensor(name, torch.float32), wq), name
        ref = gguf.quants.dequantize(gguf.quants.quantize(src.get(name).float().numpy(),
                                                          gguf.GGMLQuantizationType.Q5_1),
                                     gguf.GGMLQuantizationType.Q5_1)
        changed += not np.array_equal(ref.reshape(wq.shape), wq.numpy())
    assert changed == len(seen)
    # data-free, the same search is still refused (llama.cpp's own rounding has no candidates)
    assert_bad_input(cli("encode", stories_dir, str(tmp_path / "x.gguf"), "--format", "gguf", "--scale-search", "8",
                         "--override", "model.layers.*.mlp.down_proj=skip"), "--scale-search 1")


# ---- bitsandbytes exports --------------------------------------------------------------------------------------

def test_bnb_nf4_gptq_is_kbits_gptq_and_loads_in_transformers(stories_dir, calib, scorer, tmp_path, monkeypatch):
    """nf4 + fp32 absmax is kbit's nf k=4 layout: the bnb export's codes/absmax are the native GPTQ encode's,
    byte for byte; transformers + bitsandbytes (CPU) give kbit's decode's logits; fewer nats than the RTN export."""
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    F = pytest.importorskip("bitsandbytes.functional")
    seen = recording(monkeypatch, bnb, "calibrated_4bit")
    rec = Recipe(bits=4, block_size=64, dtype="nf", scale_dtype="fp32", method="gptq")
    encode(stories_dir, str(tmp_path / "native"), rec, calib=calib)
    r = encode(stories_dir, str(tmp_path / "gptq"), rec, fmt="bnb", calib=calib)
    encode(stories_dir, str(tmp_path / "rtn"), Recipe(bits=4, block_size=64, dtype="nf", scale_dtype="fp32"), fmt="bnb")
    assert r["calibration"]["calibrated_tensors"] == 35 == len(seen)
    native = load_file(str(tmp_path / "native" / "model.safetensors"))
    ours = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    rtn_ = load_file(str(tmp_path / "rtn" / "model.safetensors"))
    reader = open_foreign(str(tmp_path / "gptq"))
    for n in seen:
        assert torch.equal(ours[n].view(-1), native[f"{n}.codes"])
        assert torch.equal(ours[f"{n}.absmax"], native[f"{n}.scales"])
        assert not torch.equal(ours[n], rtn_[n]), n  # GPTQ changed the codes
        st = F.QuantState.from_dict({k[len(n) + 1:]: v for k, v in ours.items() if k.startswith(n + ".")},
                                    torch.device("cpu"))
        assert torch.equal(F.dequantize_4bit(ours[n], st), seen[n])  # bitsandbytes decodes the forward's weights
        assert torch.equal(reader.tensor(n, torch.float32), seen[n])
    theirs = bnb_generic_path(AutoModelForCausalLM.from_pretrained(str(tmp_path / "gptq")))
    decode(str(tmp_path / "gptq"), str(tmp_path / "dense"), "fp32")
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    diff = (logits(theirs) - logits(dense)).abs().max().item()
    assert diff < 1e-4, diff
    base = scorer.baseline()["nll"]
    n_rtn = nll(scorer, reader_model(str(tmp_path / "rtn"), stories_dir))
    n_gptq = nll(scorer, dense)
    print(f"bnb nf4 dNLL vs dense: rtn {n_rtn - base:.4f}, gptq {n_gptq - base:.4f}; max logit diff {diff:.2e}")
    assert n_gptq < n_rtn - 0.02, (n_gptq, n_rtn)
    assert json.load(open(tmp_path / "gptq" / "kbit_manifest.json"))["calibration"]["tokens_used"] == TOKENS


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_bnb_fp4_double_quant_calibrated(stories_dir, calib, tmp_path, monkeypatch, method):
    """fp4 (bnb's own unsorted table) + double quant, GPTQ and RTN-with-calib: bitsandbytes decodes exactly the
    forward's weights, transformers loads the folder with kbit's decode's logits, and the codes differ from the
    data-free export."""
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    F = pytest.importorskip("bitsandbytes.functional")
    seen = recording(monkeypatch, bnb, "calibrated_4bit")
    rec = Recipe(bits=4, block_size=64, dtype="fp", double_quant=True, scale_dtype="fp32", method=method)
    r = encode(stories_dir, str(tmp_path / "cal"), rec, fmt="bnb", calib=calib)
    encode(stories_dir, str(tmp_path / "rtn"), Recipe(bits=4, block_size=64, dtype="fp", double_quant=True,
                                                      scale_dtype="fp32"), fmt="bnb")
    assert r["calibration"]["calibrated_tensors"] == 35 == len(seen)
    ours = load_file(str(tmp_path / "cal" / "model.safetensors"))
    rtn_ = load_file(str(tmp_path / "rtn" / "model.safetensors"))
    for n in seen:
        assert torch.equal(ours[f"{n}.quant_map"], F.get_4bit_type("fp4", device="cpu"))
        assert not torch.equal(ours[n], rtn_[n]), n
        st = F.QuantState.from_dict({k[len(n) + 1:]: v for k, v in ours.items() if k.startswith(n + ".")},
                                    torch.device("cpu"))
        assert torch.equal(F.dequantize_4bit(ours[n], st), seen[n]), n
    theirs = bnb_generic_path(AutoModelForCausalLM.from_pretrained(str(tmp_path / "cal")))
    decode(str(tmp_path / "cal"), str(tmp_path / "dense"), "fp32")
    diff = (logits(theirs) - logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")))).abs().max().item()
    assert diff < 1e-4, diff


def test_compressed_tensors_gptq_is_kbits_gptq_and_beats_rtn(stories_dir, calib, scorer, tmp_path):
    """kbit's int grid is compressed-tensors' symmetric integer grid: the calibrated export decodes (through the
    compressed-tensors reader) to the native GPTQ encode's weights, and loses fewer nats than its RTN export."""
    row = Override("model.layers.*.mlp.down_proj", {"block_size": "row"})  # groups must divide the row of 172
    rec = Recipe(bits=4, block_size=64, dtype="int", method="gptq", overrides=[row])
    encode(stories_dir, str(tmp_path / "native"), rec, calib=calib)
    r = encode(stories_dir, str(tmp_path / "gptq"), rec, fmt="compressed-tensors", calib=calib)
    encode(stories_dir, str(tmp_path / "rtn"), Recipe(bits=4, block_size=64, dtype="int", overrides=[row]),
           fmt="compressed-tensors")
    assert r["calibration"]["calibrated_tensors"] == 35
    native, ours = KbitCheckpoint(str(tmp_path / "native")), open_foreign(str(tmp_path / "gptq"))
    rtn_ = open_foreign(str(tmp_path / "rtn"))
    for n in (n for n in native.names if native.is_quantized(n)):
        torch.testing.assert_close(ours.tensor(n, torch.float32), native.tensor(n, torch.float32), rtol=0, atol=1e-6)
        assert not torch.equal(ours.tensor(n, torch.float32), rtn_.tensor(n, torch.float32)), n
    assert nll(scorer, reader_model(str(tmp_path / "gptq"), stories_dir)) < nll(scorer, reader_model(str(tmp_path / "rtn"), stories_dir))


def test_foreign_formats_refuse_asymmetric_calibration(stories_dir, halves, tmp_path):
    """Every format takes --calib now; GPTAQ's asymmetric statistics are the native format's only, and a foreign
    export refuses them before any work, writing nothing."""
    from kbitcli.errors import KbitError

    asym = Calibration(halves[0], tokens=256, asymmetric=True)
    for fmt, rec in (("compressed-tensors", Recipe(dtype="int", method="gptq", overrides=[
            Override("model.layers.*.mlp.down_proj", {"block_size": "row"})])),
            ("bnb", Recipe(method="gptq", scale_dtype="fp32"))):
        dst = tmp_path / fmt
        with pytest.raises(KbitError, match="asymmetric") as e:
            encode(stories_dir, str(dst), rec, fmt=fmt, calib=asym)
        assert e.value.exit_code == 2 and not dst.exists()
