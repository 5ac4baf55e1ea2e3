"""What every command shares: stderr console, --json / --quiet, and turning errors into exit codes.

stdout carries only the `--json` object, so `kbit ... --json | jq` always works (a failed `--json` run prints
one `{"error": ..., "exit_code": ..., "file": ...}` object there); everything for people (progress, tables,
messages) goes to stderr, and `--quiet` silences it. Progress is a rich bar on a terminal and plain lines on a
log or pipe; KBIT_PROGRESS=1 forces the bar, KBIT_PROGRESS=0 turns progress off.
"""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console

from kbitcli.errors import KbitError, Terminated
from kbitcli.progress import LineProgress, NullProgress, RichProgress, StepProgress, stop_all

JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout (and nothing else there).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress, tables or messages on stderr.")
ForceOpt = typer.Option(False, "--force", help="Replace DST if it exists.")


def console(quiet: bool) -> Console:
    return Console(stderr=True, quiet=quiet)


def progress_for(quiet: bool, con: Console, *, steps: bool = False):
    """The progress display for a command: none with --quiet or KBIT_PROGRESS=0; a rich bar on a terminal (or
    with KBIT_PROGRESS=1); otherwise plain lines on stderr, for CI logs and pipes. steps=True: a bar counting
    steps (batches, cells) rather than bytes and tensors."""
    setting = os.environ.get("KBIT_PROGRESS", "").strip()
    if quiet or setting == "0":
        return NullProgress()
    if setting == "1" or con.is_terminal:
        return StepProgress(con) if steps else RichProgress(con)
    return LineProgress(con)


def run(fn, *, as_json: bool, quiet: bool, show=None):
    """Call fn() -> dict; print it as JSON or hand it to show(result, console); map errors to exit codes.
    A failure prints one line on stderr and, with --json, one {"error", "exit_code", "file"} object on stdout."""
    con = console(quiet)
    try:
        try:
            result = fn(con)
        except BaseException:
            stop_all(failed=True)  # a stage the error left open: no bar or heartbeat under the error line
            raise
    except KbitError as e:
        fail(f"kbit: error: {one_line(str(e))}", e.exit_code, as_json)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        fail(f"kbit: {what}; nothing was written", 1, as_json)
    except MemoryError:
        fail("kbit: error: out of memory; try a smaller --max-shard-size or close other programs", 1, as_json)
    except Exception as e:  # a bug of ours: one line, with the way to see the traceback
        if os.environ.get("KBIT_DEBUG"):
            raise
        fail(one_line(f"kbit: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                      "(set KBIT_DEBUG=1 for the traceback and report it)"), 1, as_json)
    stop_all()
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    elif show is not None:
        show(result, con)
    return result


def fail(line: str, code: int, as_json: bool):
    """Print the error line on stderr (and, with --json, its JSON object on stdout), then exit with code."""
    print(line, file=sys.stderr)
    if as_json:
        message = line.removeprefix("kbit: error: ") if line.startswith("kbit: error: ") else line.removeprefix("kbit: ")
        sys.stdout.write(json.dumps({"error": message, "exit_code": code, "file": file_named(message)}) + "\n")
        sys.stdout.flush()
    raise typer.Exit(code)


FILE_SUFFIXES = (".safetensors", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".gguf", ".bin", ".pt", ".pth", ".csv")


def file_named(message: str) -> str | None:
    """The path an error message starts with (`PATH: what is wrong`, `PATH:LINE: ...`), or None when it starts
    with something else (an option, a tensor, a type name)."""
    head, sep, _ = message.partition(": ")
    if not sep or not head or len(head) > 4096 or head.startswith("-"):
        return None
    parts = head.rsplit(":", 1)
    if len(parts) == 2 and parts[1].isdigit():  # a line number: file.jsonl:12
        head = parts[0]
    try:
        if os.path.lexists(head):
            return head
    except (ValueError, OSError):
        return None
    if any(c.isspace() for c in head) or any(c in head for c in "'\"()[]{}"):
        return None
    # not on disk (a missing input, a Hub id): a path by its look; `model.layers.0.weight` is a tensor, not a file
    return head if ("/" in head or os.sep in head or head.lower().endswith(FILE_SUFFIXES)) else None


def one_line(message: str, limit: int = 2000) -> str:
    """An error message as one line of bounded length: a hostile input (a megabyte-long YAML value, a name full
    of newlines) must not flood the terminal or a CI log. The start (what is wrong) and the end (the fix) stay."""
    message = " ".join(message.splitlines())
    if len(message) <= limit:
        return message
    return f"{message[: limit - 500]} …[{len(message) - limit + 3} characters cut]… {message[-497:]}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"
