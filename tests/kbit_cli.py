"""Running `kbit` in tests: in-process (typer's CliRunner, fast) or as a real subprocess (the installed
console script: honest exit codes, stdout/stderr separation, signals), and the checks every bad input gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from typer.testing import CliRunner

from kbitcli.commands.app import app


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def kbit_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "kbit")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "kbitcli"]


def cli(*args: str, env: dict | None = None) -> Result:
    """In process. Uncaught exceptions would surface as a non-SystemExit `exception`: we refuse those."""
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"kbit {' '.join(map(str, args))} raised {r.exception!r}") from r.exception
    return Result(r.exit_code, r.stdout, r.stderr)


def kbit(*args: str, env: dict | None = None, timeout: float = 300) -> Result:
    """As a subprocess of the installed `kbit` script."""
    p = subprocess.run(kbit_command() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return Result(p.returncode, p.stdout, p.stderr)


def leftovers(parent: str) -> list[str]:
    """Temporary or backup names AtomicOutput may create beside a destination."""
    return [f for f in os.listdir(parent) if ".kbit-tmp" in f or ".kbit-old" in f]


def assert_json_error(stdout: str, line: str, code: int) -> None:
    """stdout after a failure: empty, or one JSON object {"error", "exit_code", "file"} (a --json run)."""
    if stdout == "":
        return
    obj = json.loads(stdout)
    assert stdout.count("\n") == 1 and obj["exit_code"] == code and obj["error"] == line.removeprefix("kbit: error: ")


def assert_bad_input(r: Result, *mentions: str, dst: str | None = None, code: int = 2) -> None:
    """Exit 2, exactly one line on stderr naming what is wrong, no traceback, no output; stdout empty, or (with
    --json) the one JSON error object that says the same."""
    assert r.code == code, f"exit {r.code}, stderr: {r.stderr!r}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    assert lines[0].startswith("kbit: error: ") and "Traceback" not in r.stderr
    assert_json_error(r.stdout, lines[0], code)
    for m in mentions:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    if dst is not None:
        assert not os.path.lexists(dst), f"{dst} was left behind"
        parent = os.path.dirname(os.path.abspath(dst))
        if os.path.isdir(parent):
            assert leftovers(parent) == []
