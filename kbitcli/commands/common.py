"""What every command shares: stderr console, --json / --quiet, and turning errors into exit codes.

stdout carries only the `--json` object, so `kbit ... --json | jq` always works; everything for people
(progress bars, tables, messages) goes to stderr, and `--quiet` silences it.
"""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console

from kbitcli.errors import KbitError, Terminated
from kbitcli.progress import NullProgress, RichProgress

JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout (and nothing else there).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress, tables or messages on stderr.")
ForceOpt = typer.Option(False, "--force", help="Replace DST if it exists.")


def console(quiet: bool) -> Console:
    return Console(stderr=True, quiet=quiet)


def progress_for(quiet: bool, con: Console):
    return NullProgress() if quiet or not con.is_terminal and os.environ.get("KBIT_PROGRESS") != "1" else RichProgress(con)


def run(fn, *, as_json: bool, quiet: bool, show=None):
    """Call fn() -> dict; print it as JSON or hand it to show(result, console); map errors to exit codes."""
    con = console(quiet)
    try:
        result = fn(con)
    except KbitError as e:
        print(f"kbit: error: {one_line(str(e))}", file=sys.stderr)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"kbit: {what}; nothing was written", file=sys.stderr)
        raise typer.Exit(1)
    except MemoryError:
        print("kbit: error: out of memory; try a smaller --max-shard-size or close other programs", file=sys.stderr)
        raise typer.Exit(1)
    except Exception as e:  # a bug of ours: one line, with the way to see the traceback
        if os.environ.get("KBIT_DEBUG"):
            raise
        print(f"kbit: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(set KBIT_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        raise typer.Exit(1)
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    elif show is not None:
        show(result, con)
    return result


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
