"""kbit generate MODEL --prompt ...: see a dense or k-bit checkpoint write text."""

from __future__ import annotations

import os
from typing import Optional

import typer

from kbitcli.commands.app import app
from kbitcli.commands.common import JsonOpt, QuietOpt, run
from kbitcli.errors import bad_input


def show(result: dict, con) -> None:
    q = result["quantization"]
    what = f"k={q['bits']} {q['dtype']} B={q['block_size']}" if q else "dense"
    con.print(f"[dim]{result['model']} ({result['architecture']}, {what}); "
              f"{result['new_tokens']} tokens in {result['seconds']} s[/dim]")
    con.print(f"[bold]{result['prompt']}[/bold]", end="", highlight=False)
    # the continuation as the tokenizer decodes the whole text, so spacing at the seam is right
    text = result["text"]
    con.print(text[len(result["prompt"]):] if text.startswith(result["prompt"]) else " " + result["completion"],
              markup=False, highlight=False)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="Model folder: dense Hugging Face or kbit checkpoint."),
    prompt: str = typer.Option("Once upon a time", "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default); > 0 samples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 for the dense tensors and compute."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt,
):
    """Continue a prompt with MODEL (greedy by default): the quick way to see a k-bit model work."""
    from kbitcli.models.generate import generate

    def work(con):
        if threads is not None:
            if threads < 1:  # torch raises a bare RuntimeError for it
                raise bad_input(f"--threads {threads}: give a number of CPU threads, at least 1 "
                                f"(this machine has {os.cpu_count()})")
            import torch

            torch.set_num_threads(threads)
        return generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, dtype=dtype)

    run(work, as_json=as_json, quiet=quiet, show=show)
