"""kbit decode SRC DST: k-bit checkpoint back to a standard dense safetensors checkpoint."""

from __future__ import annotations

from typing import Optional

import typer

from kbitcli.commands.app import app
from kbitcli.commands.common import ForceOpt, JsonOpt, QuietOpt, human_bytes, progress_for, run
from kbitcli.decode import decode


@app.command("decode")
def decode_cmd(
    src: str = typer.Argument(..., help="k-bit checkpoint (file or folder)."),
    dst: str = typer.Argument(..., help="Dense output (file for a file, folder for a folder)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | fp16 | bf16 (default: each tensor's original dtype)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard."),
    force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
):
    """Dequantize SRC into a dense checkpoint that transformers loads like the original."""

    def show(r, con):
        con.print(f"decoded {r['tensors']} tensors ({human_bytes(r['bytes_out'])}, {r['dtype']}) -> {r['destination']} "
                  f"in {r['seconds']} s")

    run(lambda con: decode(src, dst, dtype, force=force, max_shard_size=max_shard_size, progress=progress_for(quiet, con)),
        as_json=as_json, quiet=quiet, show=show)
