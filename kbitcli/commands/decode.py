"""kbit decode SRC DST: k-bit checkpoint back to a standard dense safetensors checkpoint."""

from __future__ import annotations

from typing import Optional

import typer

from kbitcli.commands.common import ForceOpt, JsonOpt, QuietOpt, human_bytes, progress_for, run
from kbitcli.commands.options import RemovedDtypeOpt, check_torch_dtype, torch_dtype_option
from kbitcli.decode import decode


def decode_cmd(
    src: str = typer.Argument(..., help="k-bit checkpoint (file or folder)."),
    dst: str = typer.Argument(..., help="Dense output (file for a file, folder for a folder)."),
    torch_dtype: Optional[str] = torch_dtype_option(
        None, "of the dense tensors written: fp32 | fp16 | bf16 (default: each tensor's original dtype)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard."),
    force: bool = ForceOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):
    """Dequantize SRC into a dense checkpoint that transformers loads like the original."""

    def show(r, con):
        con.print(f"decoded {r['tensors']} tensors ({human_bytes(r['bytes_out'])}, {r['dtype']}) -> {r['destination']} "
                  f"in {r['seconds']} s")

    def work(con):
        return decode(src, dst, check_torch_dtype(torch_dtype), force=force, max_shard_size=max_shard_size,
                      progress=progress_for(quiet, con))

    run(work, as_json=as_json, quiet=quiet, show=show)
