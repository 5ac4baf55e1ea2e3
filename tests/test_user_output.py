"""What people and CI see (issue #13): plain progress lines when stderr is a log or pipe, one JSON error object on
stdout for a failed `--json` run, the download hint for a Hugging Face Hub id, and shell completion."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import threading
import time

import pytest

from kbit_cli import assert_bad_input, cli, kbit, kbit_command
from kbitcli.progress import LineProgress, NullProgress, RichProgress

HUB_ID = "HuggingFaceTB/SmolLM2-135M"
HINT = f"`huggingface-cli download {HUB_ID} --local-dir SmolLM2-135M`"


def no_progress_env() -> dict:
    """The environment without a KBIT_PROGRESS of the caller's."""
    return {k: v for k, v in os.environ.items() if k != "KBIT_PROGRESS"}


def run_piped(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed script with stdout and stderr piped (not terminals), as in CI or `2>log`."""
    return subprocess.run(kbit_command() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True, timeout=300, env={**no_progress_env(), **(env or {})})


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kbit: encode")]


# ---- progress on a non-terminal stderr


def test_encode_to_a_pipe_prints_plain_progress_lines(stories_dir, tmp_path):
    p = run_piped("encode", stories_dir, tmp_path / "q")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    lines = progress_lines(p.stderr)
    assert lines[0] == "kbit: encode: 47 tensors, 1.0 MB", p.stderr  # the stage's start
    assert re.fullmatch(r"kbit: encode 100% \(47/47 tensors, 1\.0 MB/1\.0 MB\) done in [\d.]+ s", lines[-1]), lines
    assert "\x1b[" not in p.stderr.split("encoded")[0]  # plain text: no cursor movement or colour in a log
    assert "35/47 tensors quantized" in p.stderr  # the summary still follows


def test_json_keeps_stdout_clean_while_progress_goes_to_stderr(stories_dir, tmp_path):
    p = run_piped("encode", stories_dir, tmp_path / "q", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1 and json.loads(p.stdout)["quantized_tensors"] == 35
    assert progress_lines(p.stderr)[-1].startswith("kbit: encode 100% (47/47 tensors")


@pytest.mark.parametrize("how", [["--quiet"], ["-q", "--json"], "KBIT_PROGRESS=0"])
def test_quiet_and_kbit_progress_0_print_no_progress(stories_dir, tmp_path, how):
    env = {"KBIT_PROGRESS": "0"} if how == "KBIT_PROGRESS=0" else None
    flags = [] if env else how
    p = run_piped("encode", stories_dir, tmp_path / "q", *flags, env=env)
    assert p.returncode == 0, p.stderr
    assert progress_lines(p.stderr) == []
    if "--quiet" in flags or "-q" in flags:
        assert p.stderr == ""
    else:
        assert "35/47 tensors quantized" in p.stderr  # KBIT_PROGRESS=0 silences progress only


def test_progress_choice(monkeypatch):
    from rich.console import Console

    from kbitcli.commands.common import progress_for

    piped = Console(stderr=True, force_terminal=False)
    terminal = Console(stderr=True, force_terminal=True)
    monkeypatch.delenv("KBIT_PROGRESS", raising=False)
    assert type(progress_for(False, piped)) is LineProgress
    assert type(progress_for(False, terminal)) is RichProgress
    assert type(progress_for(True, piped)) is NullProgress and type(progress_for(True, terminal)) is NullProgress
    monkeypatch.setenv("KBIT_PROGRESS", "1")
    assert type(progress_for(False, piped)) is RichProgress
    monkeypatch.setenv("KBIT_PROGRESS", "0")
    assert type(progress_for(False, terminal)) is NullProgress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Sink:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


class FakeConsole:
    def __init__(self):
        self.file = Sink()


def test_status_line_counts_tensors_and_bytes_with_eta():
    clock, con = Clock(), FakeConsole()
    p = LineProgress(con, clock=clock, grace=1e9, interval=1e9)  # no line from the timer thread
    p.start("encode", 115_000_000, 35)
    for _ in range(12):
        p.advance("t", 40_100_000 // 12)
    clock.now += 3.2
    with p.lock:
        line = p._status()
    assert line == "kbit: encode 34% (12/35 tensors, 40.1 MB/115 MB) 3.2 s elapsed, ~6.0 s left"
    p.stop()  # unfinished and never announced (it failed fast): nothing, the error line says it all
    assert con.file.text == ""


def test_a_finished_fast_stage_prints_its_start_and_end():
    clock, con = Clock(), FakeConsole()
    p = LineProgress(con, clock=clock, grace=1e9, interval=1e9)
    p.start("calibrate", 0, 4)
    for i in range(4):
        p.advance(f"block {i + 1}/4", 0)
    clock.now += 75
    p.stop()
    p.stop()  # twice (an explicit stop, then the context manager's): one end line
    assert con.file.text.splitlines() == ["kbit: calibrate: 4 blocks",
                                          "kbit: calibrate 100% (4/4 blocks) done in 1 min 15 s"]


def test_lines_come_on_a_timer_and_at_each_tenth():
    """Real time, short periods: the start line after `grace`, a heartbeat every `interval` while one slow item
    runs, then a line at each further 10% of the work (no minimum gap here)."""
    con = FakeConsole()
    p = LineProgress(con, grace=0.05, interval=0.15, min_gap=0.0)
    p.start("encode", 1000, 10)
    deadline = time.monotonic() + 20
    while con.file.text.count("\n") < 3 and time.monotonic() < deadline:  # start + two heartbeats
        time.sleep(0.05)
    lines = con.file.text.splitlines()
    assert lines[0] == "kbit: encode: 10 tensors, 1.0 KB"
    assert lines[1].startswith("kbit: encode 0% (0/10 tensors, 0 B/1.0 KB)") and "elapsed" in lines[1]
    p.interval = 1e9  # from here on, only the tenths
    before = len(con.file.text.splitlines())
    for _ in range(5):
        p.advance("t", 100)
    lines = con.file.text.splitlines()[before:]
    assert [re.match(r"kbit: encode (\d+)%", line).group(1) for line in lines] == ["10", "20", "30", "40", "50"]
    assert lines[-1].startswith("kbit: encode 50% (5/10 tensors, 500 B/1.0 KB)") and "left" in lines[-1]
    p.stop(failed=True)
    assert con.file.text.splitlines()[-1].startswith("kbit: encode stopped at 50% (5/10 tensors")
    assert not any(t.name == "kbit-progress" for t in threading.enumerate())


def test_a_stage_that_fails_leaves_one_error_line_and_no_heartbeat(stories_dir, tmp_path, monkeypatch):
    """A stage left open by an error is stopped before the error line: fast, nothing but the error line; slow,
    its `stopped at` line and then the error line, last."""
    from kbitcli.commands import common
    from kbitcli.errors import bad_input
    from kbitcli.formats import kbit_write

    real = kbit_write.encode_tensor
    calls = []

    def failing(src, t, spill):
        calls.append(t.name)
        if len(calls) == 3:
            time.sleep(slow[0])
            raise bad_input(f"{t.name}: damaged for the test")
        return real(src, t, spill)

    monkeypatch.setattr(kbit_write, "encode_tensor", failing)
    monkeypatch.delenv("KBIT_PROGRESS", raising=False)
    slow = [0.0]
    r = cli("encode", stories_dir, tmp_path / "a")
    assert_bad_input(r, "damaged for the test", dst=str(tmp_path / "a"))

    calls.clear()
    slow[0] = 0.5
    monkeypatch.setattr(common, "LineProgress", functools.partial(LineProgress, grace=0.05, interval=0.1))
    r = cli("encode", stories_dir, tmp_path / "b")
    assert r.code == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("kbit: encode: 47 tensors")
    assert lines[-2].startswith("kbit: encode stopped at") and lines[-1].startswith("kbit: error: ")
    time.sleep(0.3)
    assert not any(t.name == "kbit-progress" for t in threading.enumerate())


# ---- --json errors


def json_error(r) -> dict:
    assert r.stdout.count("\n") == 1, r.stdout
    obj = json.loads(r.stdout)
    assert set(obj) == {"error", "exit_code", "file"}
    assert obj["exit_code"] == r.code
    (line,) = r.stderr.strip().splitlines()
    return obj, line


def test_json_error_object_for_a_missing_input(tmp_path):
    missing = str(tmp_path / "nope")
    r = kbit("encode", missing, tmp_path / "q", "--json")
    obj, line = json_error(r)
    assert r.code == 2 and line.startswith("kbit: error: ")
    assert obj["error"] == line.removeprefix("kbit: error: ")
    assert obj["file"] == missing
    # without --json: stdout stays empty, as before
    assert_bad_input(kbit("encode", missing, tmp_path / "q"), missing)


def test_json_error_names_the_damaged_file(stories_dir, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(stories_dir, src)
    (src / "config.json").write_text("{not json")
    r = cli("encode", src, tmp_path / "q", "--json")
    obj, line = json_error(r)
    assert r.code == 2 and obj["error"] == line.removeprefix("kbit: error: ")
    assert obj["file"] == str(src / "config.json")


def test_json_error_without_a_path_has_file_null(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "q", "--bits", "9", "--json")
    obj, line = json_error(r)
    assert r.code == 2 and obj["error"] == line.removeprefix("kbit: error: ") and obj["file"] is None


@pytest.mark.parametrize("exc, code, start", [
    (RuntimeError("boom"), 1, "internal error: RuntimeError: boom"),
    (KeyboardInterrupt(), 1, "interrupted; nothing was written"),
])
def test_json_error_for_internal_errors_and_interrupts(stories_dir, tmp_path, monkeypatch, exc, code, start):
    from kbitcli.formats import kbit_write

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(kbit_write, "encode_tensor", broken)
    monkeypatch.delenv("KBIT_DEBUG", raising=False)
    r = cli("encode", stories_dir, tmp_path / "q", "--json")
    obj, line = json_error(r)
    assert r.code == code and obj["error"].startswith(start) and obj["file"] is None
    assert line == "kbit: " + obj["error"]


# ---- a Hugging Face Hub id as SRC


@pytest.mark.parametrize("cmd", [["encode", HUB_ID, "out"], ["decode", HUB_ID, "out"], ["inspect", HUB_ID]])
def test_hub_id_gets_the_download_command(tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    r = cli(*cmd)
    assert_bad_input(r, f"{HUB_ID}: no such file or folder; kbit reads local checkpoints: download it first with {HINT}")


@pytest.mark.parametrize("path", ["./org/name", "/org/name", "org/name/sub", "org/", "nope", ".org/name",
                                  "org/na me"])
def test_other_missing_paths_get_the_plain_message(tmp_path, monkeypatch, path):
    from kbitcli.io.folder import missing_path_error

    monkeypatch.chdir(tmp_path)
    assert str(missing_path_error(path)) == f"{path}: no such file or folder"
    assert "huggingface-cli" in str(missing_path_error("org/name.v2_x-1"))


# ---- shell completion


def test_completion_options_and_completion_itself():
    r = cli("--help", env={"COLUMNS": "200"})
    assert r.code == 0 and "--install-completion" in r.stdout and "--show-completion" in r.stdout
    p = subprocess.run(kbit_command(), capture_output=True, text=True, timeout=120,
                       env={**os.environ, "_KBIT_COMPLETE": "complete_bash", "COMP_WORDS": "kbit enc", "COMP_CWORD": "1"})
    assert p.returncode == 0 and p.stdout.split() == ["encode"], (p.stdout, p.stderr)


def test_finetune_to_a_pipe_prints_training_lines(nf4, tmp_path):
    """finetune in a CI log: a start line, step lines with loss and tok/s, and the last step."""
    text = tmp_path / "train.txt"
    text.write_text("Once upon a time there was a little cat. " * 200)
    p = run_piped("finetune", nf4, tmp_path / "ft", "--data", text, "--steps", "6", "--batch-size", "2",
                  "--context", "32")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("kbit: finetune")]
    assert lines[0] == "kbit: finetune: 6 steps to go (0 done)", p.stderr
    assert re.fullmatch(r"kbit: finetune step 6/6 \(100%\), loss [\d.]+, [\d,]+ tok/s, \d+ s elapsed", lines[-1]), lines


def test_training_lines_come_every_interval():
    from io import StringIO

    from rich.console import Console

    from kbitcli.finetune.progress import LineTrainProgress

    now = [0.0]
    buf = StringIO()
    bar = LineTrainProgress(Console(file=buf, width=200), interval=10, clock=lambda: now[0])
    bar.start(100, 0)
    for step in range(1, 101):
        now[0] += 1.0  # one second per step: a line at 10 s, 20 s, ... and the last step
        bar.update(step, 2.0, 1000.0)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 + 10 and lines[1].startswith("kbit: finetune step 10/100 (10%)") and "~90 s left" in lines[1]
    assert lines[-1].startswith("kbit: finetune step 100/100 (100%)") and "left" not in lines[-1]
