"""kbit generate MODEL --prompt ...: see a dense or k-bit checkpoint write text."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from kbitcli.commands.common import JsonOpt, QuietOpt, run
from kbitcli.commands.options import RemovedDtypeOpt, check_torch_dtype, torch_dtype_option
from kbitcli.errors import bad_input


def show(result: dict, con) -> None:
    """The text is the command's product: stdout (pipe it, or `> calib.txt`); the summary line is stderr."""
    q = result["quantization"]
    what = f"k={q['bits']} {q['dtype']} B={q['block_size']}" if q else "dense"
    con.print(f"[dim]{result['model']} ({result['architecture']}, {what}); "
              f"{result['new_tokens']} tokens in {result['seconds']} s[/dim]")
    if "samples" in result:  # one sample per paragraph: a calibration file as `--calib` reads it
        sys.stdout.write("\n\n".join(" ".join(t.split("\n")) for t in result["samples"]) + "\n")
    else:
        sys.stdout.write(result["text"] + "\n")


def generate_cmd(
    model: str = typer.Argument(..., help="Model folder: dense Hugging Face or kbit checkpoint."),
    prompt: str = typer.Option("Once upon a time", "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default); > 0 samples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    torch_dtype: Optional[str] = torch_dtype_option(None, "of the dense tensors and compute: fp32 | bf16 | fp16."),
    samples: int = typer.Option(1, "--samples", help="Independent samples to draw (needs --temperature > 0); "
                                "with --prompt '' this writes calibration text sampled from the model itself."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):
    """Continue a prompt with MODEL (greedy by default): the quick way to see a k-bit model work."""
    from kbitcli.models.generate import generate

    def work(con):
        dtype = check_torch_dtype(torch_dtype)
        if threads is not None:
            if threads < 1:  # torch raises a bare RuntimeError for it
                raise bad_input(f"--threads {threads}: give a number of CPU threads, at least 1 "
                                f"(this machine has {os.cpu_count()})")
            import torch

            torch.set_num_threads(threads)
        return generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, dtype=dtype,
                        samples=samples)

    run(work, as_json=as_json, quiet=quiet, show=show)
