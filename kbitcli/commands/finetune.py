"""kbit finetune KBIT_MODEL OUT --data FILE: LoRA on a frozen k-bit model (flags override the recipe)."""

from __future__ import annotations

from typing import List, Optional

import typer

from kbitcli.commands.common import JsonOpt, QuietOpt, progress_for, run
from kbitcli.commands.options import RemovedDtypeOpt, check_torch_dtype, torch_dtype_option
from kbitcli.finetune import TrainConfig, finetune, load_config, with_flags
from kbitcli.progress import LineProgress, NullProgress

# the settings used without --recipe, read from TrainConfig so the help cannot drift from what runs
D = TrainConfig()


def show(r: dict, con) -> None:
    def f(x):
        return "-" if x is None else f"{x:.4f}"

    con.print(f"trained {r['steps'] - r['start_step']} steps ({r['tokens_trained']:,} tokens, "
              f"{r['tokens_per_s'] or 0:,.0f} tok/s) of a rank-{r['rank']} adapter on {r['targets']} layers "
              f"({r['trainable_params']:,} params); train loss {f(r['train_loss_first'])} -> {f(r['train_loss_last'])}")
    if r["eval_loss_before"] is not None:
        con.print(f"eval loss {f(r['eval_loss_before'])} -> {f(r['eval_loss_after'])} nats/token on {r['eval_tokens']:,} tokens")
    for mode, m in r["merged"].items():
        con.print(f"merged ({mode}) -> {m['path']}" + (f", eval loss {f(m['eval_loss'])}" if "eval_loss" in m else ""))
    con.print(f"adapter (PEFT format), train_log.jsonl, loss.png -> {r['out']}; peak RSS {r['peak_rss_mb']:.0f} MB")


def finetune_cmd(
    model: str = typer.Argument(..., help="k-bit checkpoint folder (from `kbit encode`)."),
    out: str = typer.Argument(..., help="Run folder: adapter (PEFT format), log, loss curve, checkpoints, merges."),
    data: str = typer.Option(..., "--data", help="Training text: plain .txt, or .jsonl with a 'text' field."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out text: eval loss before, during, after."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="YAML finetune recipe (recipes/finetune-lora.yaml); flags override its keys. Without one the defaults below apply."),
    rank: Optional[int] = typer.Option(None, "--rank", help=f"LoRA rank r (default: {D.rank})."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help=f"LoRA alpha, scaling alpha/r (default: {D.alpha:g})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Learning rate, AdamW, constant after warmup (default: {D.lr:g})."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Optimizer steps (default: {D.steps})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Blocks per step (default: {D.batch_size})."),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens per block (default: {D.context})."),
    targets: Optional[List[str]] = typer.Option(None, "--targets", help="Modules to adapt: glob or 're:' regex (repeatable) (default: every k-bit linear)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help=f"Dropout on the adapter input (default: {D.dropout:g})."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seed for A's init, data order and dropout (default: {D.seed})."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help=f"Warmup: fraction of steps (< 1) or steps (>= 1) (default: {D.warmup:g})."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help=f"Max global grad norm, 0: off (default: {D.grad_clip:g})."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=f"AdamW weight decay (default: {D.weight_decay:g})."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help=f"Steps between evals, 0: before/after only (default: {D.eval_every})."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help=f"Steps between resume checkpoints, 0: only at the end and on Ctrl-C (default: {D.save_every})."),
    rslora: Optional[bool] = typer.Option(None, "--rslora/--no-rslora", help=f"Scaling alpha/sqrt(r) instead of alpha/r (default: {'on' if D.rslora else 'off'})."),
    merge: Optional[str] = typer.Option(None, "--merge", help="Also write OUT/merged-kbit (re-encoded with the base's plan) or OUT/merged-dense."),
    merge_dtype: Optional[str] = typer.Option(None, "--merge-dtype", help="dtype of --merge dense: fp32 | bf16 | fp16 (default: original)."),
    torch_dtype: str = torch_dtype_option("fp32", "the non-adapter parts compute in: fp32 | bf16."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT's run from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (start the run over)."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, _dtype: Optional[str] = RemovedDtypeOpt,
):
    """Train a LoRA adapter on the frozen k-bit model, then optionally merge it (k-bit or dense)."""

    def work(con):
        from kbitcli.io.atomic import check_not_overlapping

        dtype = check_torch_dtype(torch_dtype)
        check_not_overlapping(out, [("recipe", recipe)])  # --force would delete a recipe kept inside OUT
        cfg = with_flags(load_config(recipe), rank=rank, alpha=alpha, lr=lr, steps=steps, batch_size=batch_size,
                         context=context, targets=targets, dropout=dropout, seed=seed, warmup=warmup,
                         grad_clip=grad_clip, weight_decay=weight_decay, eval_every=eval_every,
                         save_every=save_every, rslora=rslora)
        from kbitcli.finetune.progress import LineTrainProgress, NullTrainProgress, RichTrainProgress

        shown = progress_for(quiet, con)  # the same choice every command makes: none, lines or a rich bar
        bar = (LineTrainProgress(con) if isinstance(shown, LineProgress) else
               NullTrainProgress() if isinstance(shown, NullProgress) else RichTrainProgress(con))
        return finetune(model, out, data, cfg, eval_data=eval_data, merge=merge, merge_dtype=merge_dtype,
                        resume=resume, force=force, dtype=dtype, progress=bar)

    run(work, as_json=as_json, quiet=quiet, show=show)
