"""The `kbit` command: a thin Typer layer over the Python API (one module per command)."""

from __future__ import annotations

import typer

from kbitcli import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn checkpoints into k-bit ones (k = 2..8), run, finetune, decode and measure them.")


def _version(value: bool):
    if value:
        print(f"kbit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


def _register():
    # each module registers its command on `app`
    from kbitcli.commands import bench, decode, encode, finetune, generate, inspect  # noqa: F401


_register()


def main():
    app()
