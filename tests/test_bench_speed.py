"""kbit bench speed on the real stories260K: the numbers exist, are consistent, and bad input is refused."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from kbitcli.bench.speed import bench_speed
from kbitcli.commands.app import app
from kbitcli.core import matvec
from kbitcli.errors import KbitError
from kbitcli.recipes import Recipe


def test_cli_dense_model_json_and_out(stories_dir, tmp_path):
    out = tmp_path / "speed"
    args = ["bench", "speed", stories_dir, "-k", "4", "-b", "64", "--runs", "3", "--warmup", "1", "--seq", "32",
            "--threads", "1", "--out", str(out), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["quantization"]["bits"] == 4
    # which kernel ran: this machine's instruction set and the CPython call (gcc and Python.h are present here)
    assert res["kernel"] == matvec.describe() and res["kernel"].startswith(("AVX2 + FMA", "AVX-512 VBMI"))
    for stage in ("encode", "decode"):
        assert res[stage]["mb_per_s"] > 0 and res[stage]["bytes_in"] > 0
    # decode writes back as many tensor bytes as encode read (the file adds only its header)
    assert res["encode"]["bytes_in"] == res["decode"]["bytes_out"]
    assert 0 < os.path.getsize(os.path.join(stories_dir, "model.safetensors")) - res["encode"]["bytes_in"] < 10_000
    f = res["forward"]
    assert len(f["dense_runs_ms"]) == len(f["kbit_runs_ms"]) == 3
    assert f["ratio"] == pytest.approx(f["kbit_ms"] / f["dense_ms"], rel=1e-2)
    # the headline: batch-1 generation tokens/s of k-bit, dense fp32 and dense bf16 in the same run; prefill too
    g, p = res["generate"], res["prefill"]
    assert g["tokens"] == 32 and p["tokens"] == 128
    for part, unit in ((g, "tokens_per_s"), (p, "ms"), (f, "ms")):
        assert set(part[unit]) == {"dense", "dense_bf16", "kbit"} and min(part[unit].values()) > 0
        assert part["vs_dense"]["dense"] == 1.0
        assert part["vs_dense"]["kbit"] == pytest.approx(part[unit]["kbit"] / part[unit]["dense"], rel=1e-2)
    assert f["ms"]["kbit"] == pytest.approx(f["kbit_ms"], rel=1e-3)
    qm = res["memory"]["quantized_modules"]
    assert qm["modules"] == 35 and qm["stored_bits_per_param"] == pytest.approx(4.25)
    assert qm["ratio_vs_bf16"] == pytest.approx(4.25 / 16, rel=0.03)
    assert res["memory"]["kbit_weight_bytes"] < 0.3 * res["memory"]["dense_weight_bytes"]
    assert res["rss"]["dense_delta"] > 0 and res["rss"]["kbit_delta"] > 0
    assert json.loads((out / "speed.json").read_text())["forward"]["dense_runs_ms"] == f["dense_runs_ms"]
    # the same --out again without --force is refused before any work
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_kbit_model_is_decoded_for_its_baseline(stories_dir, tmp_path):
    import kbitcli.api as kbit

    q = str(tmp_path / "k8")
    kbit.encode(stories_dir, q, Recipe(bits=8, block_size=128, dtype="int", double_quant=True))
    res = bench_speed(q, batch=2, seq=16, runs=2, warmup=0, dtype="bf16", rss=False)
    assert res["encode"] is None and res["decode"]["mb_per_s"] > 0
    assert res["dtype"] == "bf16" and "rss" not in res
    assert set(res["generate"]["tokens_per_s"]) == {"dense", "kbit"}  # bf16 is already the baseline: no extra copy
    qm = res["memory"]["quantized_modules"]
    # 8-bit codes, 8-bit double-quantized scales per 128 values (+ the fp32 second-level constants)
    assert 8 + 8 / 128 < qm["stored_bits_per_param"] < 8 + 8 / 128 + 0.01
    assert qm["ratio_vs_bf16"] == pytest.approx(qm["stored_bits_per_param"] / 16, rel=0.03)
    with pytest.raises(KbitError, match="already a kbit checkpoint"):
        bench_speed(q, Recipe(bits=4), rss=False)


def test_bad_inputs(stories_dir, tmp_path):
    r = CliRunner().invoke(app, ["bench", "speed", stories_dir, "--seq", "4096", "--no-rss", "--runs", "1"])
    assert r.exit_code == 2 and "--seq 4096" in r.stderr
    r = CliRunner().invoke(app, ["bench", "speed", stories_dir, "--prefill", "4096", "--no-rss", "--runs", "1"])
    assert r.exit_code == 2 and "--prefill 4096" in r.stderr  # checked like --seq, before any timing
    r = CliRunner().invoke(app, ["bench", "speed", stories_dir, "--generate-tokens", "-1", "--no-rss"])
    assert r.exit_code == 2 and "--generate-tokens" in r.stderr
    r = CliRunner().invoke(app, ["bench", "speed", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a model folder" in r.stderr
    r = CliRunner().invoke(app, ["bench", "speed", stories_dir, "-k", "9"])
    assert r.exit_code == 2 and "bits" in r.stderr


def test_kernel_description(monkeypatch):
    """bench speed names the kernel that ran; with KBIT_KERNEL=0 it says the torch path ran instead."""
    assert matvec.describe().endswith("CPython entry point") == (matvec.python_include() is not None)
    assert ("integer path for k = 4 / k = 8 int" in matvec.describe()) == bool(matvec.kernel().kbit_has_int16())
    old = matvec.set_exact(True)
    try:
        assert "off (KBIT_EXACT=1)" in matvec.describe() or not matvec.kernel().kbit_has_int16()
    finally:
        matvec.set_exact(old)
    monkeypatch.setattr(matvec, "ENABLED", False)
    assert matvec.describe().startswith("off (KBIT_KERNEL=0)")
