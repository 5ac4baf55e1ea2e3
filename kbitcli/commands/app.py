"""The `kbit` command: a thin Typer layer over the Python API (one module per command)."""

from __future__ import annotations

import typer

from kbitcli import __version__
from kbitcli.commands import (bench_error, bench_ppl, bench_scaling, bench_speed, decode, encode, finetune, generate,
                              inspect, plan)

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn checkpoints into k-bit ones (k = 2..8), run, finetune, decode and measure them.")


def _version(value: bool):
    if value:
        print(f"kbit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


# one module per command, each a plain function: registered here, so no command module imports this one
app.command("encode")(encode.encode_cmd)
app.command("plan")(plan.plan_cmd)
app.command("decode")(decode.decode_cmd)
app.command("inspect")(inspect.inspect_cmd)
app.command("generate")(generate.generate_cmd)
app.command("finetune")(finetune.finetune_cmd)
bench_app = typer.Typer(no_args_is_help=True, help="Measure what each bit buys: error, perplexity, scaling, speed.")
bench_app.command("error")(bench_error.bench_error_cmd)
bench_app.command("ppl")(bench_ppl.bench_ppl_cmd)
bench_app.command("scaling")(bench_scaling.bench_scaling_cmd)
bench_app.command("speed")(bench_speed.bench_speed_cmd)
app.add_typer(bench_app, name="bench")


def main():
    app()
