"""kbit bench ...: measurement subcommands. Each lives in its own module and registers on `bench_app`."""

from __future__ import annotations

import typer

from kbitcli.commands.app import app

bench_app = typer.Typer(no_args_is_help=True, help="Measure what each bit buys: error, perplexity, scaling, speed.")
app.add_typer(bench_app, name="bench")

from kbitcli.commands import bench_error, bench_ppl, bench_scaling, bench_speed  # noqa: E402,F401  (each registers)
