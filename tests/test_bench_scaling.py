"""kbit bench scaling on two real models (stories260K, MiniLM): files, frontier, resume, interruption, bad studies."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from kbitcli.bench.frontier import frontier
from kbitcli.bench.scaling import load_study, run_study
from kbitcli.commands.app import app
from kbitcli.errors import KbitError
from kbitcli.progress import NullProgress

runner = CliRunner()
HERE = os.path.dirname(os.path.abspath(__file__))
STUDY = """\
name: t
text: {text}
models:
  - {stories}
  - path: {minilm}
    name: MiniLM
grid: {{bits: {bits}, block_size: [64], dtype: [nf]}}
recipe: {{scale_search: 1}}  # plain absmax, as in the paper (and quick to quantize)
max_tokens: 1024
max_lines: 16
"""


def kbit(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_study(path, stories_dir, minilm_dir, text, bits="[3, 4]", extra=""):
    path.write_text(STUDY.format(text=text, stories=stories_dir, minilm=minilm_dir, bits=bits) + extra)
    return path


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, stories_dir, minilm_dir, tinystories_text):
    root = tmp_path_factory.mktemp("study")
    study = write_study(root / "study.yaml", stories_dir, minilm_dir, tinystories_text)
    out = root / "out"
    r = kbit("bench", "scaling", "--recipe", study, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return root, study, out, json.loads(r.stdout)


def test_study_writes_table_report_plots_and_frontier(study_run):
    root, _, out, res = study_run
    assert res["cells"] == 6 and res["evaluated"] == 6 and res["reused"] == 0
    assert "simulated" in res["evaluation"]
    for f in ("results.csv", "results.json", "report.md", "cells.jsonl", "plots/dtype-nf.png", "plots/block-64.png",
              "plots/frontier.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6
    by = {(r["model"], r["dtype"], r["bits"]): r for r in rows}
    dense = by[("stories260K", "dense", "")]
    assert int(dense["total_bits"]) == 260032 * 32  # every parameter at its stored width (fp32)
    k3, k4 = by[("stories260K", "nf", "3")], by[("stories260K", "nf", "4")]
    # 35 linear weights (226,560 params) at k + 16/64 bits, the other 33,472 params still fp32, plus the nf table
    for k, row in ((3, k3), (4, k4)):
        expected = 226560 * (k + 0.25) + 33472 * 32
        assert expected <= int(row["total_bits"]) <= expected + 2**k * 32
    assert float(k4["metric"]) < float(k3["metric"]) and float(dense["metric"]) < float(k4["metric"])
    m3, m4 = by[("MiniLM", "nf", "3")], by[("MiniLM", "nf", "4")]
    assert m3["metric_name"] == "1-cosine" and 0 < float(m4["metric"]) < float(m3["metric"]) < 1
    report = (out / "report.md").read_text()
    assert "Verdict" in report and "MiniLM" in report and "plots/frontier.png" in report


def test_frontier_is_pareto(study_run):
    _, _, _, res = study_run
    for model, v in res["verdict"].items():
        f = v["frontier"]
        bits = [x["from_bits"] for x in f]
        metric = [x["metric"] for x in f]
        assert bits == sorted(bits) and all(b < a for a, b in zip(metric, metric[1:])), (model, f)
    assert res["verdict"]["stories260K"]["frontier"][-1]["config"] == "dense"
    cells = [{"total_bits": b, "metric": m, "model": "x"} for b, m in [(1, 5.0), (2, 6.0), (3, 4.0), (3, 3.0), (5, 3.5)]]
    assert [(c["total_bits"], c["metric"]) for c in frontier(cells)] == [(1, 5.0), (3, 3.0)]
    # totals within 0.1% are one budget: 32 bits of codebook table do not make a frontier point
    near = [{"total_bits": 100_000, "metric": 2.0}, {"total_bits": 100_032, "metric": 1.9}, {"total_bits": 100_016, "metric": 2.5}]
    assert [c["metric"] for c in frontier(near)] == [1.9]


def test_resume_reuses_finished_cells(study_run, tmp_path, stories_dir, minilm_dir, tinystories_text):
    root, study, out, _ = study_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    again = kbit("bench", "scaling", "--recipe", study, "--out", copy)
    assert again.exit_code == 2 and "--resume" in again.output
    r = kbit("bench", "scaling", "--recipe", study, "--out", copy, "--resume", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (res["evaluated"], res["reused"]) == (0, 6)
    # a bigger grid on the same text reuses what is done and runs only the new cells
    bigger = write_study(tmp_path / "bigger.yaml", stories_dir, minilm_dir, tinystories_text, bits="[3, 4, 8]")
    r = kbit("bench", "scaling", "--recipe", bigger, "--out", copy, "--resume", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (res["evaluated"], res["reused"]) == (2, 6)
    # other evaluation options: the old cells are not reusable
    other = write_study(tmp_path / "other.yaml", stories_dir, minilm_dir, tinystories_text, extra="context: 256\n")
    r = kbit("bench", "scaling", "--recipe", other, "--out", copy, "--resume")
    assert r.exit_code == 2 and "--force" in r.output


class StopAfter(NullProgress):
    """Ctrl-C after n cells, as a user would press it."""

    def __init__(self, n):
        self.n = n

    def advance(self, item, nbytes=0):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def test_interrupted_study_resumes(tmp_path, stories_dir, tinystories_text):
    study = tmp_path / "s.yaml"
    study.write_text(f"text: {tinystories_text}\nmodels: [{stories_dir}]\ngrid: {{bits: [2, 3, 4]}}\nmax_tokens: 512\n"
                     "recipe: {scale_search: 1}\n")
    out = tmp_path / "out"
    with pytest.raises(KbitError) as e:
        run_study(str(study), str(out), progress=StopAfter(2))
    assert e.value.exit_code == 1 and "--resume" in str(e.value)
    assert len((out / "cells.jsonl").read_text().splitlines()) == 1 + 2  # header + dense + k=2
    assert not (out / "results.csv").exists()
    with open(out / "cells.jsonl", "a") as fh:
        fh.write('{"model": "stories260K", "bits": 3, "blo')  # a line cut short by a crash
    res = run_study(str(study), str(out), resume=True)
    assert (res["evaluated"], res["reused"]) == (2, 2)
    assert (out / "results.csv").exists()


def test_shipped_study_parses():
    study = load_study(os.path.join(HERE, "..", "recipes", "study-tiny.yaml"))
    assert [m["name"] for m in study["models"]] == ["stories260K", "all-MiniLM-L6-v2"]
    assert all(os.path.isdir(m["path"]) for m in study["models"]) and os.path.isfile(study["text"])
    assert {r.bits for r in study["recipes"]} == set(range(2, 9))


@pytest.mark.parametrize("body, words", [
    ("text: {text}\nmodels: [{stories}]\ngrid: {{bits: [4]}}\ncolour: red\n", "unknown key(s) colour"),
    ("text: {text}\nmodels: [{stories}]\ngrid: {{bits: 2..x}}\n", "range"),
    ("text: {text}\nmodels: [{stories}]\ngrid: {{bitz: [4]}}\n", "unknown key"),
    ("text: {text}\nmodels: [{stories}]\ngrid: {{block_size: [48]}}\n", "power of two"),
    ("text: {text}\nmodels: []\ngrid: {{bits: [4]}}\n", "non-empty list"),
    ("text: {text}\nmodels: [/nonexistent/model]\ngrid: {{bits: [4]}}\n", "does not exist"),
    ("text: /nonexistent.txt\nmodels: [{stories}]\ngrid: {{bits: [4]}}\n", "does not exist"),
    ("models: [{stories}]\ngrid: {{bits: [4]}}\n", "missing key 'text'"),
    ("text: {text}\nmodels: [{{path: {stories}, nick: x}}]\ngrid: {{bits: [4]}}\n", "models[0]"),
    ("text: {text}\nmodels: [pkg:no_such_pkg_xyz/model]\ngrid: {{bits: [4]}}\n", "not installed"),
    ("text: {text}\nmodels: [{stories}]\ngrid: {{bits: [4]}}\nmax_tokens: -3\n", "max_tokens"),
    ("text: [unclosed\n", "not valid YAML"),
    ("text: {text}\nmodels: [{stories}]\ngrid: {{bits: [4], scale_refit: [maybe]}}\n", "true/false"),
    ("text: {text}\nmodels: [{stories}]\ncalib: {text}\ngrid: {{bits: [4], method: [gptq], scale_refit: [true]}}\n",
     "scale_refit applies to data-free"),
])
def test_bad_study_is_one_line_exit_2(tmp_path, stories_dir, tinystories_text, body, words):
    study = tmp_path / "bad.yaml"
    study.write_text(body.format(text=tinystories_text, stories=stories_dir))
    r = kbit("bench", "scaling", "--recipe", study, "--out", tmp_path / "out")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kbit: error:") and words in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_empty_text_and_missing_study(tmp_path, stories_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    study = tmp_path / "s.yaml"
    study.write_text(f"text: {empty}\nmodels: [{stories_dir}]\ngrid: {{bits: [4]}}\n")
    r = kbit("bench", "scaling", "--recipe", study, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "empty" in r.output
    r = kbit("bench", "scaling", "--recipe", tmp_path / "missing.yaml", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "not found" in r.output


def test_study_figures_zoom_on_quantized_cells_with_labelled_frontier(study_run):
    """The real study's rows (results.json): each frontier panel ends well before the dense model's bits, names the
    dense reference, labels every quantized frontier cell, and no two labels overlap."""
    import itertools

    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from kbitcli.bench.plots import frontier_figure

    _, _, out, _ = study_run
    rows = json.load(open(out / "results.json"))["rows"]
    fig = frontier_figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    try:
        for model in ("stories260K", "MiniLM"):
            (ax,) = [a for a in fig.axes if a.get_title() == model]
            mine = [r for r in rows if r["model"] == model]
            dense = next(r for r in mine if r["dtype"] == "dense")
            quantized = [r for r in mine if r["dtype"] != "dense"]
            assert max(r["total_bits"] for r in quantized) <= ax.get_xlim()[1] < dense["total_bits"]
            assert [t.get_gid() for t in ax.texts].count("dense") == 1
            labels = [Text.get_window_extent(t, renderer) for t in ax.texts if t.get_gid() in ("frontier-label", "dense")]
            assert len(labels) == len(frontier(quantized)) + 1
            assert not any(a.overlaps(b) for a, b in itertools.combinations(labels, 2))
    finally:
        plt.close(fig)


def test_scale_refit_axis_cells_differ_and_old_cells_resume(tmp_path, stories_dir, tinystories_text):
    """grid scale_refit: [false, true] gives two cells per k (refit lowers the weights' error, so the metrics
    differ); cells.jsonl written before the axis (no scale_refit field) are reused as the refit-free cells."""
    study = tmp_path / "s.yaml"
    study.write_text(f"text: {tinystories_text}\nmodels: [{stories_dir}]\nmax_tokens: 512\n"
                     "grid: {bits: [3], scale_refit: [false, true]}\nrecipe: {scale_search: 1}\n")
    out = tmp_path / "out"
    res = run_study(str(study), str(out))
    assert (res["cells"], res["evaluated"]) == (3, 3)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()[1:]]
    q = {c["scale_refit"]: c for c in cells if c["dtype"] != "dense"}
    assert set(q) == {False, True} and q[False]["metric"] != q[True]["metric"]
    assert q[False]["total_bits"] == q[True]["total_bits"]  # the refit changes which scales, not how many bits
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["scale_refit"] for r in rows if r["dtype"] == "nf") == ["False", "True"]
    report = (out / "report.md").read_text()
    assert "refit" in report and "ΔNLL ± SE" in report
    assert f"{q[True]['delta_nll']:+.4f} ± {q[True]['delta_nll_se']:.4f}" in report
    nf = [r for r in rows if r["dtype"] == "nf"]
    assert all(float(r["delta_nll_se"]) > 0 and float(r["delta_nll"]) > 2 * float(r["delta_nll_se"]) for r in nf), nf
    # an old cells file: drop the field from every cell; the refit-free cells are reused, the refit one re-run
    lines = (out / "cells.jsonl").read_text().splitlines()
    old = [lines[0]] + [json.dumps({k: v for k, v in json.loads(x).items() if k != "scale_refit"})
                        for x in lines[1:] if not json.loads(x).get("scale_refit")]
    (out / "cells.jsonl").write_text("\n".join(old) + "\n")
    res = run_study(str(study), str(out), resume=True)
    assert (res["evaluated"], res["reused"]) == (1, 2)
