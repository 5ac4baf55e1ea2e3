"""kbit plan: the solver spends the budget without exceeding it, the recipe it writes encodes to exactly the
predicted bytes and gives every tensor the planned settings, and bad input is one line, exit 2."""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest

from kbit_cli import assert_bad_input, cli
from kbitcli.allocate.choices import parse_budget, parse_choices
from kbitcli.allocate.planner import plan
from kbitcli.allocate.solve import lower_hull, solve
from kbitcli.calibration.data import Calibration
from kbitcli.encode import encode, plan_source
from kbitcli.errors import KbitError
from kbitcli.formats.source import open_source
from kbitcli.io.folder import weight_files
from kbitcli.recipes import load_recipe


def test_lower_hull_keeps_only_convex_non_dominated_points():
    # (cost, loss): (2, 5) is above the segment (1, 9)-(4, 0); (5, 3) is dominated by (4, 0); (3, 1) is kept
    costs, losses = [1, 2, 3, 4, 5, None], [9, 8, 1, 0, 3, 0]
    assert lower_hull(costs, losses) == [0, 2, 3]


def _brute(costs, losses, budget):
    best = None
    for pick in itertools.product(*[range(len(r)) for r in costs]):
        c = sum(costs[t][i] for t, i in enumerate(pick))
        if c <= budget:
            l = sum(losses[t][i] for t, i in enumerate(pick))
            best = l if best is None or l < best else best
    return best


@pytest.mark.parametrize("seed", range(8))
def test_solver_never_exceeds_the_budget_and_is_near_optimal(seed):
    rng = random.Random(seed)
    costs = [sorted(rng.randint(10, 100) for _ in range(4)) for _ in range(5)]
    losses = [sorted((rng.random() * 10 for _ in range(4)), reverse=True) for _ in range(5)]
    lo, hi = sum(r[0] for r in costs), sum(r[-1] for r in costs)
    for budget in (lo, (lo + hi) // 2, lo + (hi - lo) // 3, hi):
        pick = solve(costs, losses, budget)
        spent = sum(costs[t][i] for t, i in enumerate(pick))
        loss = sum(losses[t][i] for t, i in enumerate(pick))
        assert spent <= budget
        # no single change both fits and lowers the loss (the greedy fill ran to the end)
        for t in range(5):
            for i in range(4):
                if spent - costs[t][pick[t]] + costs[t][i] <= budget:
                    assert losses[t][i] >= losses[t][pick[t]] - 1e-12
        assert loss <= _brute(costs, losses, budget) * 1.25 + 1e-9


def test_solver_hits_an_exactly_reachable_budget_and_refuses_a_too_small_one():
    costs = [[8, 16, 24]] * 4
    losses = [[4.0, 1.0, 0.5], [8.0, 2.0, 1.0], [1.0, 0.5, 0.25], [2.0, 1.0, 0.1]]
    pick = solve(costs, losses, 72)
    assert sum(costs[t][i] for t, i in enumerate(pick)) == 72
    with pytest.raises(KbitError, match="below the cheapest"):
        solve(costs, losses, 31)


def test_budget_and_choice_parsing():
    assert parse_budget("3.5").kind == "bits" and parse_budget("3.5").value == 3.5
    assert parse_budget("60MB").value == 60_000_000 and parse_budget("1GiB").value == 2**30
    assert len(parse_choices("bits=3..4 block=64 dtype=nf dq=true,false")) == 4
    assert len(parse_choices("bits=2..8 block=32,64,128 dtype=nf,int dq=true")) == 42
    for bad in ("60000000", "3.5 parsecs", "-1"):
        with pytest.raises(KbitError):
            parse_budget(bad)


def _encoded_bytes(dst):
    files = [dst] if os.path.isfile(dst) else weight_files(dst, pickles=False)
    return sum(os.path.getsize(f) for f in files)


@pytest.mark.parametrize("budget", ["3.5", "300KB"])
def test_the_plan_encodes_to_exactly_the_predicted_bytes(stories_dir, tmp_path, budget):
    out = tmp_path / "plan.yaml"
    r = cli("plan", stories_dir, "--budget", budget, "-o", out, "--json")
    assert r.code == 0, r.stderr
    result = json.loads(r.stdout)
    assert os.path.getsize(tmp_path / "plan.png") > 1000
    enc = encode(stories_dir, str(tmp_path / "q"), load_recipe(str(out)))
    assert _encoded_bytes(str(tmp_path / "q")) == enc["bytes_out"] == result["predicted"]["bytes_out"]
    if budget.endswith("KB"):
        assert enc["bytes_out"] <= 300_000
        assert enc["bytes_out"] > 300_000 - 2000  # spent: within a few blocks of the budget
    else:
        assert enc["bits_per_param_quantized"] <= 3.5
        assert result["predicted"]["bits_per_param_quantized"] > 3.49
    # the recipe round-trips: every planned tensor gets exactly the planned settings, by its exact name
    planned = {t["name"]: t for t in result["tensors"]}
    eplan = plan_source(open_source(stories_dir), load_recipe(str(out)))
    assert {t.name for t in eplan.quantized} == set(planned)
    for t in eplan.quantized:
        p = planned[t.name]
        assert (t.spec.bits, t.block_label, t.spec.dtype, t.spec.double_quant) == \
               (p["bits"], p["block_size"], p["dtype"], p["double_quant"])
        assert t.rule == f"override {t.name}"
    text = out.read_text()
    assert text.startswith("# kbit plan:") and f"--budget {budget}" in text and "predicted:" in text


def test_json_shape_and_more_bits_predict_less_loss(stories_dir):
    r = cli("plan", stories_dir, "--budget", "3", "--choices", "bits=2..5 block=64", "--json")
    assert r.code == 0, r.stderr
    low = json.loads(r.stdout)
    assert set(low) >= {"budget", "predicted", "tensors", "recipe_yaml", "limits", "sensitivity", "seconds"}
    assert low["sensitivity"] == "weight" and low["choices_count"] == 8
    assert abs(sum(t["share"] for t in low["tensors"]) - 1) < 1e-9
    assert {t["block_size"] for t in low["tensors"]} == {64}
    high = plan(stories_dir, "4.5", choices="bits=2..5 block=64")
    assert high["predicted"]["loss"] < low["predicted"]["loss"]
    assert high["predicted"]["bytes_out"] > low["predicted"]["bytes_out"]


def test_calibrated_plan_uses_the_fisher_sensitivity(stories_dir, tinystories_text):
    calib = Calibration(tinystories_text, 512, 0)
    data_free = plan(stories_dir, "3.5")
    fisher = plan(stories_dir, "3.5", calib=calib)
    assert fisher["sensitivity"] == "fisher" and fisher["calibration"]["tokens"] >= 512
    assert fisher["predicted"]["bits_per_param_quantized"] <= 3.5
    # a different importance gives a different allocation
    assert [t["choice"] for t in fisher["tensors"]] != [t["choice"] for t in data_free["tensors"]]


def _self_texts() -> set[str]:
    import tempfile

    return {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("kbit-plan-self-")}


def test_self_calibration_samples_the_models_own_text(stories_dir):
    before = _self_texts()
    r = cli("plan", stories_dir, "--budget", "3.25", "--calib", "self", "--calib-tokens", "512", "--json")
    assert r.code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["sensitivity"] == "fisher" and result["calibration"]["file"].startswith("self (")
    assert result["predicted"]["bits_per_param_quantized"] <= 3.25
    assert "--calib self" in result["recipe_yaml"].splitlines()[3]
    assert _self_texts() <= before  # the sampled text is not left behind


@pytest.mark.parametrize("args, mentions", [
    (["--budget", "1.5"], ["2.0724", "8.262"]),          # below the cheapest: both limits named
    (["--budget", "9"], ["2.0724", "8.262"]),            # above the richest
    (["--budget", "60000000"], ["unit"]),                # a size without its unit
    (["--budget", "1KB"], ["bytes"]),                    # a size below the cheapest plan
    (["--budget", "3.5", "--choices", "bits="], ["empty choice set"]),
    (["--budget", "3.5", "--choices", "color=red"], ["KEY=VALUES"]),
    (["--budget", "3.5", "--sensitivity", "fisher"], ["--calib"]),
    (["--budget", "3.5", "--calib", "/nonexistent/calib.txt"], ["/nonexistent/calib.txt"]),
])
def test_bad_input_is_one_line_exit_2(stories_dir, args, mentions):
    assert_bad_input(cli("plan", stories_dir, *args), *mentions)


def test_an_existing_output_needs_force(stories_dir, tmp_path):
    out = tmp_path / "plan.yaml"
    out.write_text("keep me\n")
    assert_bad_input(cli("plan", stories_dir, "--budget", "3.5", "-o", out), str(out))
    assert out.read_text() == "keep me\n"
    assert cli("plan", stories_dir, "--budget", "3.5", "-o", out, "--force", "-q").code == 0
    assert out.read_text().startswith("# kbit plan:")


def test_bench_scaling_draws_planned_mixes(stories_dir, tinystories_text, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"name: t\ntext: {tinystories_text}\nmodels: [{stories_dir}]\n"
                     "grid: {bits: [3, 4], block_size: [64], dtype: [nf]}\nmax_tokens: 256\n")
    r = cli("bench", "scaling", "-r", study, "--out", tmp_path / "out", "--plans", "3.5", "--json")
    assert r.code == 0, r.stderr
    cells = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").read_text().splitlines()[1:]]
    planned = [c for c in cells if c["dtype"] == "plan"]
    assert len(planned) == 1 and planned[0]["bits"] == 3.5 and planned[0]["bits_per_param"] <= 3.5
    uniform = {c["bits"]: c for c in cells if c["dtype"] == "nf"}
    # the 3.5-bit mix lies between uniform k = 3 and k = 4 in total bits
    assert uniform[3]["total_bits"] < planned[0]["total_bits"] < uniform[4]["total_bits"]
    assert (tmp_path / "out" / "plots" / "frontier.png").exists()
    assert_bad_input(cli("bench", "scaling", "-r", study, "--out", tmp_path / "o2", "--plans", "x"), "--plans")
