"""Issue 10's hostile inputs, as regression tests: nothing outside DST is ever removed, damaged checkpoints fail
(exit 1, naming the tensor) instead of decoding to garbage, killed runs are cleaned up, hostile indexes and YAML
are refused, finetune stops at the first NaN, and the former "internal errors" are exit 2 with a fix.

Each test runs on the bundled stories260K (or its nf4 encoding, shared with the finetune tests); all are
in-process except the two that need a real process (SIGTERM, a dead PID)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kbit_cli import assert_bad_input, cli, leftovers
from kbitcli.errors import KbitError


def tree_hash(path: str) -> str:
    """sha256 over every file name and content under path (or of the file itself)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        h.update(open(p, "rb").read())
    return h.hexdigest()


def rewrite(path: str, edit) -> None:
    """Re-save a safetensors file after edit(tensors, metadata) changed it in place (a consistent header)."""
    with safe_open(path, framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def assert_failure(r, *mentions: str, dst: str | None = None) -> None:
    assert_bad_input(r, *mentions, dst=dst, code=1)


@pytest.fixture
def kbit_copy(nf4, tmp_path) -> str:
    dst = str(tmp_path / "k")
    shutil.copytree(nf4, dst)
    return dst


@pytest.fixture
def train_txt(tinystories_text, tmp_path) -> str:
    p = tmp_path / "train.txt"
    p.write_text(open(tinystories_text).read()[:4000])
    return str(p)


# --- 1. --force never deletes anything outside DST --------------------------------------------------------


def test_force_into_a_folder_holding_the_source_deletes_nothing(stories_dir, tmp_path, monkeypatch):
    """Issue: `cd w && kbit encode src . --force` removed src/ and every other file in w/."""
    w = tmp_path / "w"
    shutil.copytree(stories_dir, w / "src")
    (w / "notes.txt").write_text("x")
    before = tree_hash(str(w))
    monkeypatch.chdir(w)
    assert_bad_input(cli("encode", "src", ".", "--force"), "destination contains the source")
    assert_bad_input(cli("encode", str(w / "src"), str(tmp_path), "--force"), "contains the source")
    assert tree_hash(str(w)) == before


def test_destination_inside_the_source_is_refused(stories_dir, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(stories_dir, src)
    before = tree_hash(src)
    assert_bad_input(cli("encode", src, f"{src}/q"), "lies inside the source", dst=f"{src}/q")
    assert tree_hash(src) == before


def test_decode_into_a_folder_holding_the_checkpoint_is_refused(kbit_copy, tmp_path):
    before = tree_hash(kbit_copy)
    assert_bad_input(cli("decode", kbit_copy, str(tmp_path), "--force"), "contains the source")
    assert tree_hash(kbit_copy) == before


def test_finetune_out_may_not_be_the_base_or_hold_the_data(kbit_copy, train_txt, tmp_path):
    before = tree_hash(kbit_copy)
    assert_bad_input(cli("finetune", kbit_copy, kbit_copy, "--data", train_txt, "--force"), "is the base model")
    run = tmp_path / "run"
    run.mkdir()
    data = shutil.copy(train_txt, run / "train.txt")
    assert_bad_input(cli("finetune", kbit_copy, run, "--data", data, "--force"), "contains the --data")
    assert tree_hash(kbit_copy) == before and os.path.exists(data)


# --- 2. inspect --verify: every file must be listed --------------------------------------------------------


def test_verify_fails_when_the_manifest_lists_nothing(kbit_copy):
    """Issue: `"outputs": []` + zeroed codes verified as {"ok": true, "files": 0}."""
    man = os.path.join(kbit_copy, "kbit_manifest.json")
    m = json.load(open(man))
    json.dump({**m, "outputs": []}, open(man, "w"))
    rewrite(os.path.join(kbit_copy, "model.safetensors"),
            lambda t, md: t.update({k: torch.zeros_like(v) for k, v in t.items() if k.endswith(".codes")}))
    assert_failure(cli("inspect", kbit_copy, "--verify"), "lists no files")


def test_verify_fails_when_the_manifest_leaves_the_weights_out(kbit_copy):
    man = os.path.join(kbit_copy, "kbit_manifest.json")
    m = json.load(open(man))
    json.dump({**m, "outputs": [r for r in m["outputs"] if r["name"] != "model.safetensors"]}, open(man, "w"))
    assert_failure(cli("inspect", kbit_copy, "--verify"), "model.safetensors: not listed")


def test_verify_does_not_follow_names_out_of_the_folder(kbit_copy):
    man = os.path.join(kbit_copy, "kbit_manifest.json")
    m = json.load(open(man))
    m["outputs"].append({"name": "../../etc/passwd", "bytes": 1, "sha256": "0" * 64})
    json.dump(m, open(man, "w"))
    assert_failure(cli("inspect", kbit_copy, "--verify"), "a path outside the checkpoint")


# --- 3. damaged checkpoints fail instead of decoding to garbage --------------------------------------------

W = "model.layers.0.mlp.down_proj.weight"


def _cut_codes(t, md):
    t[f"{W}.codes"] = t[f"{W}.codes"][: t[f"{W}.codes"].numel() // 2].clone()


def _shrink_shape(t, md):
    meta = json.loads(md["kbit.tensors"])
    meta[W]["shape"][0] //= 2
    md["kbit.tensors"] = json.dumps(meta)


def _nan_scale(t, md):
    t[f"{W}.scales"][3] = float("nan")


def _nan_codebook(t, md):
    t["kbit.codebook.nf4"][5] = float("nan")


def _no_metadata(t, md):
    del md["kbit.tensors"]


def _bad_bits(t, md):
    meta = json.loads(md["kbit.tensors"])
    meta[W]["bits"] = 9
    md["kbit.tensors"] = json.dumps(meta)


@pytest.mark.parametrize("damage", [_cut_codes, _shrink_shape, _nan_scale, _nan_codebook, _no_metadata, _bad_bits])
def test_damaged_checkpoint_fails_naming_the_tensor(kbit_copy, tmp_path, damage):
    rewrite(os.path.join(kbit_copy, "model.safetensors"), damage)
    dst = str(tmp_path / "d")
    assert_failure(cli("decode", kbit_copy, dst), W, "damaged", "--verify", dst=dst)
    from kbitcli.models.load import load_model

    with pytest.raises(KbitError, match="damaged") as e:
        load_model(kbit_copy, tokenizer=False)
    assert e.value.exit_code == 1


def test_an_intact_checkpoint_still_decodes(kbit_copy, tmp_path):
    assert cli("decode", kbit_copy, str(tmp_path / "d"), "--quiet").code == 0


# --- 4. signals, killed runs, two runs at once, `DST/` for a file -----------------------------------------

SIGTERM_MID_ENCODE = """
import os, signal, sys
import kbitcli.formats.kbit_write as enc
real = enc.encode_tensor
def term_then_encode(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)  # what `timeout`, `kill` and `docker stop` send
    return real(*a, **k)
enc.encode_tensor = term_then_encode
from kbitcli.commands.app import app
sys.argv = ["kbit", "encode", sys.argv[1], sys.argv[2]]
app()
"""


def test_sigterm_cleans_up_like_ctrl_c(stories_dir, tmp_path):
    dst = str(tmp_path / "q")
    p = subprocess.run([sys.executable, "-c", SIGTERM_MID_ENCODE, stories_dir, dst], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr
    assert "terminated (SIGTERM)" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.lexists(dst) and leftovers(str(tmp_path)) == [] and os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_removed_and_reported(stories_dir, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its PID is now free: whatever carries it was left by a killed run
    (tmp_path / f".a.kbit-tmp-{dead.pid}").mkdir()
    (tmp_path / f".a.kbit-tmp-{dead.pid}" / "model.safetensors").write_text("half")
    (tmp_path / f".b.safetensors.kbit-tmp-{dead.pid}.manifest.json").write_text("{}")
    (tmp_path / f"c.kbit-old-{dead.pid}").write_text("the previous c, set aside just before the kill")
    (tmp_path / f".d.kbit-tmp-{os.getpid()}").mkdir()  # a live process's: kept
    r = cli("encode", stories_dir, str(tmp_path / "q"), "--quiet")
    assert r.code == 0, r.stderr
    assert r.stderr.count(f"process {dead.pid}") == 3
    assert sorted(os.listdir(tmp_path)) == [f".d.kbit-tmp-{os.getpid()}", "c", "q"]
    assert (tmp_path / "c").read_text().startswith("the previous c")


def test_a_second_run_into_the_same_destination_is_refused(stories_dir, tmp_path):
    from kbitcli.io.atomic import AtomicOutput

    dst = str(tmp_path / "q")
    with AtomicOutput(dst, folder=True, force=False):  # a first run, still writing
        assert_bad_input(cli("encode", stories_dir, dst, "--force"), "another kbit run", ".q.kbit-lock")
    assert cli("encode", stories_dir, dst, "--quiet", "--force").code == 0  # the first one is done: replace it
    assert sorted(os.listdir(tmp_path)) == ["q"]  # the lock went with the run


def test_file_source_with_a_folder_destination_is_refused(stories_dir, tmp_path):
    dst = f"{tmp_path}/newdir/"
    assert_bad_input(cli("encode", f"{stories_dir}/model.safetensors", dst), "ends with '/'")
    assert os.listdir(tmp_path) == []


def test_overlong_destination_name_is_refused(stories_dir, tmp_path):
    assert_bad_input(cli("encode", stories_dir, str(tmp_path / ("q" * 245))), "name is 245 bytes")


# --- 5. shard indexes may only name files inside the folder -----------------------------------------------


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_weight_map_outside_the_folder_is_refused(stories_dir, tmp_path, target):
    src = tmp_path / "m"
    shutil.copytree(stories_dir, src)
    shutil.move(str(src / "model.safetensors"), tmp_path / "outside.safetensors")
    names = list(safe_open(str(tmp_path / "outside.safetensors"), framework="pt").keys())
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    assert_bad_input(cli("encode", src, tmp_path / "q"), "outside", dst=str(tmp_path / "q"))


def test_kbit_index_outside_the_folder_is_refused(kbit_copy, tmp_path):
    names = list(safe_open(f"{kbit_copy}/model.safetensors", framework="pt").keys())
    json.dump({"weight_map": {n: "../k/model.safetensors" for n in names}},
              open(f"{kbit_copy}/model.safetensors.index.json", "w"))
    assert_bad_input(cli("decode", kbit_copy, tmp_path / "d"), "outside", dst=str(tmp_path / "d"))


# --- 6. YAML with limits -----------------------------------------------------------------------------------

# 400 bytes that stand for 9^9 values; before the limits: over 40 s and 4.7 GB, then a message echoing them all
BOMB = "bits: [&a [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
    f"&{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "]\n"


@pytest.mark.parametrize("text, needle", [
    (BOMB, "aliases are expanded"),
    ("bits: " + "[" * 3000 + "]" * 3000 + "\n", "levels deep"),
    ("a: &a [*a]\nbits: *a\n", "refers to itself"),
    ("#" + "x" * (1 << 20) + "\n", "larger than 1 MB"),
])
def test_hostile_yaml_is_refused_quickly(stories_dir, tmp_path, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    r = cli("encode", stories_dir, tmp_path / "q", "--recipe", recipe)
    assert_bad_input(r, needle, dst=str(tmp_path / "q"))


def test_error_messages_never_echo_a_huge_value(stories_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"bits: {'x' * 500_000}\n")
    r = cli("encode", stories_dir, tmp_path / "q", "--recipe", recipe)
    assert_bad_input(r, "bits", "characters cut")
    assert len(r.stderr) < 2100


# --- 7. finetune stops at the first non-finite loss or gradient --------------------------------------------


def test_finetune_that_diverges_stops_and_keeps_the_last_good_checkpoint(nf4, train_txt, tmp_path):
    out = tmp_path / "ft"
    r = cli("finetune", nf4, out, "--data", train_txt, "--steps", "6", "--context", "32", "--batch-size", "2",
            "--lr", "10000", "--grad-clip", "0", "--save-every", "1")
    assert_failure(r, "diverged at step", "last good checkpoint", "--lr")
    assert not (out / "adapter_model.safetensors").exists()
    assert json.load(open(out / "finetune_run.json"))["status"] == "diverged"
    for f in (out / "checkpoints").iterdir():  # only good steps were saved
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values())


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--alpha", "inf"), ("--grad-clip", "nan")])
def test_finetune_non_finite_settings_are_bad_input(nf4, train_txt, tmp_path, flag, value):
    out = tmp_path / "ft"
    assert_bad_input(cli("finetune", nf4, out, "--data", train_txt, flag, value), flag.lstrip("-").replace("-", "_"),
                     "finite", dst=str(out))


def test_resume_checkpoint_without_rng_state_is_bad_input(nf4, train_txt, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", nf4, out, "--data", train_txt, "--context", "32", "--batch-size", "2"]
    assert cli(*args, "--steps", "1", "--quiet").code == 0
    (ck,) = (out / "checkpoints").iterdir()
    rewrite(str(ck), lambda t, md: t.pop("rng.cpu"))
    assert_bad_input(cli(*args, "--steps", "2", "--resume"), ck.name, "RNG state")


# --- 8. inputs that were "internal errors" -----------------------------------------------------------------


@pytest.fixture(scope="module")
def state(stories_dir) -> dict[str, torch.Tensor]:
    return load_file(f"{stories_dir}/model.safetensors")


@pytest.mark.parametrize("extra, needle", [
    (torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "F8_E4M3"),
    (torch.zeros(4, 4, dtype=torch.float8_e5m2), "F8_E5M2"),
    (torch.zeros(4, dtype=torch.uint16), "U16"),
])
def test_fp8_and_unsigned_inputs_are_refused(state, tmp_path, extra, needle):
    src = str(tmp_path / "m.safetensors")
    save_file({**state, "model.extra.weight": extra}, src)
    assert_bad_input(cli("encode", src, tmp_path / "q.safetensors"), "model.extra.weight", needle, "convert",
                     dst=str(tmp_path / "q.safetensors"))


def test_bin_holding_a_list_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    assert_bad_input(cli("encode", tmp_path / "pytorch_model.bin", tmp_path / "q.safetensors"), "not a state dict")


def test_config_of_the_wrong_type_is_refused(stories_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(stories_dir, src)
    (src / "config.json").write_text("[1, 2]")
    assert_bad_input(cli("encode", src, tmp_path / "q"), "config.json", "not an object")


def test_two_shards_holding_the_same_tensor_are_refused(stories_dir, state, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(stories_dir, src, ignore=shutil.ignore_patterns("*.safetensors"))
    names = list(state)
    save_file({n: state[n] for n in names[:5]}, str(src / "a.safetensors"))
    save_file({n: state[n] for n in names[3:]}, str(src / "b.safetensors"))
    wm = {n: "a.safetensors" if i < 5 else "b.safetensors" for i, n in enumerate(names)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    assert_bad_input(cli("encode", src, tmp_path / "q"), names[3], "a.safetensors and b.safetensors", "stale shard")


def test_zero_element_tensor_is_copied_dense(state, tmp_path):
    """Empty tensors (a [0] bias, a [0, 64] weight that the default targets would pick) are copied dense."""
    src = str(tmp_path / "m.safetensors")
    save_file({**state, "model.extra.bias": torch.zeros(0), "model.extra.weight": torch.zeros(0, 64)}, src)
    assert cli("encode", src, tmp_path / "q.safetensors", "--quiet").code == 0
    assert cli("decode", tmp_path / "q.safetensors", tmp_path / "d.safetensors", "--quiet").code == 0
    out = load_file(str(tmp_path / "d.safetensors"))
    assert out["model.extra.bias"].shape == (0,) and out["model.extra.weight"].shape == (0, 64)


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_generate_threads_below_one(stories_dir, threads):
    assert_bad_input(cli("generate", stories_dir, "--threads", threads, "-n", "1"), "--threads")


def test_fp16_scale_underflow_is_refused_not_zeroed(state, tmp_path):
    """A weight of absmax ~4e-9 used to encode and decode to 100% zeros; it is refused (real run and --dry-run),
    and fp32 scales keep it."""
    name = "model.layers.0.mlp.up_proj.weight"
    src = str(tmp_path / "m.safetensors")
    save_file({**state, name: state[name] * 1e-9}, src)
    dst = str(tmp_path / "q.safetensors")
    for extra in ([], ["--dry-run"]):
        assert_bad_input(cli("encode", src, dst, *extra), name, "scale_dtype: fp32", dst=dst)
    assert cli("encode", src, dst, "--scale-dtype", "fp32", "--quiet").code == 0
    assert cli("decode", dst, tmp_path / "d.safetensors", "--quiet").code == 0
    back = load_file(str(tmp_path / "d.safetensors"))[name]
    assert back.abs().max() > 0 and torch.allclose(back, state[name] * 1e-9, rtol=0.2, atol=1e-10)


def test_dry_run_checks_values(state, tmp_path):
    """--dry-run runs every check a real run makes, NaN/Inf included (it reads the tensors once)."""
    name = "model.layers.1.self_attn.o_proj.weight"
    bad = state[name].clone()
    bad[2, 3] = float("inf")
    src = str(tmp_path / "m.safetensors")
    save_file({**state, name: bad}, src)
    assert_bad_input(cli("encode", src, tmp_path / "q.safetensors", "--dry-run"), name, "NaN/Inf")
