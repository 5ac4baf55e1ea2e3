"""finetune(): the whole `kbit finetune` run, as a Python call.

Order of work: check every input (k-bit model, data, targets, settings, OUT) before anything is written;
then create OUT and train, logging each step, evaluating and checkpointing between steps; then write the
adapter (PEFT format), the loss curve and, if asked, the merged checkpoints, and evaluate those too.

OUT is a run folder that fills up over the run, every file in it replaced atomically:
    finetune_run.json          status (running / interrupted / done), settings, inputs, summary when done
    train_log.jsonl            one line per step {step, loss, lr, grad_norm, tokens_per_s} (+ eval lines)
    checkpoints/step-N.safetensors   resume state (see checkpoint.py)
    adapter_config.json + adapter_model.safetensors   the adapter, written when training is done
    loss.png, merged-kbit/, merged-dense/
Ctrl-C during training stops after the current step, saves a checkpoint and ends with exit code 1 (the run
did not finish what was asked; `--resume` continues it). A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time

import torch

from kbitcli.errors import KbitError, bad_input
from kbitcli.finetune import checkpoint, curve, peft_io, train
from kbitcli.io.atomic import write_json
from kbitcli.finetune.config import TRAJECTORY, TrainConfig
from kbitcli.finetune.data import load_blocks
from kbitcli.finetune.lora import attach_lora, select_targets
from kbitcli.finetune.progress import NullTrainProgress
from kbitcli.formats.registry import detect
from kbitcli.io.atomic import check_not_overlapping, remove_stale
from kbitcli.io.dtypes import parse_float
from kbitcli.io.folder import missing_path_error
from kbitcli.io.manifest import sha256_file

RUN_FILE = "finetune_run.json"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_model(path: str) -> None:
    if not os.path.exists(path):
        raise missing_path_error(path)
    if detect(path) != "kbit":
        raise bad_input(f"{path} is not a kbit checkpoint; finetuning trains on a frozen k-bit base: run "
                        f"`kbit encode {path} {path.rstrip('/')}-nf4 --recipe recipes/llama-nf4.yaml` first")
    if not os.path.isdir(path):
        raise bad_input(f"{path}: finetuning needs the model folder `kbit encode` wrote (config.json, tokenizer), "
                        "not a single weights file")


def check_out(out: str, resume: bool, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise bad_input(f"{out}: folder {parent} does not exist; create it first")
    if resume:
        if not checkpoint.list_checkpoints(out):
            raise bad_input(f"{out}: no checkpoint to resume from (looked in {out}/{checkpoint.FOLDER}); "
                            "run without --resume to start")
    elif os.path.lexists(out) and not force:
        raise bad_input(f"{out} already exists; pass --resume to continue its run, --force to start over, "
                        "or choose another OUT")


def check_resume(info: dict, cfg: TrainConfig, data_sha: str, base: str, path: str) -> None:
    old = info.get("config", {})
    now = cfg.as_dict()
    for k in TRAJECTORY:
        if old.get(k) != now.get(k):
            raise bad_input(f"{path}: was made with {k}={old.get(k)!r}, this run has {k}={now.get(k)!r}; "
                            "resume with the same settings (only --steps may grow), or start over with --force")
    if info.get("data_sha256") != data_sha:
        raise bad_input(f"{path}: was trained on other data (sha256 differs); resume with the same --data")
    if info.get("base") != base:
        raise bad_input(f"{path}: was trained on {info.get('base')}, not {base}; resume with the same model")


class StopFlag:
    """SIGINT or SIGTERM (timeout, kill, docker stop) sets the flag (the loop stops after the current step and
    saves a checkpoint); a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self.previous = {}

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
        return False


def _append(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def finetune(model_path: str, out: str, data: str, cfg: TrainConfig | None = None, *, eval_data: str | None = None,
             merge: str | None = None, merge_dtype: str | None = None, resume: bool = False, force: bool = False,
             dtype: str = "fp32", device: str = "cpu", progress=None, on_step=None) -> dict:
    """Train a LoRA adapter on the frozen k-bit model at model_path; write the run folder `out`. Returns the
    summary that `--json` prints. on_step(record), if given, is called after every step (tests use it)."""
    t_start = time.time()
    cfg = cfg or TrainConfig()
    progress = progress or NullTrainProgress()
    if merge not in (None, "kbit", "dense"):
        raise bad_input(f"--merge {merge!r}: choose kbit or dense")
    if merge_dtype is not None:
        if merge != "dense":
            raise bad_input("--merge-dtype applies to --merge dense (a k-bit merge keeps the base's plan)")
        parse_float(merge_dtype, "--merge-dtype")  # a typo found now, not after the training
    check_model(model_path)
    # OUT is deleted on --force and filled during the run: it must not be, hold or lie inside any input
    check_not_overlapping(out, [("base model", model_path), ("--data", data), ("--eval-data", eval_data)])
    check_out(out, resume, force)
    for f, what in ((data, "--data"), (eval_data, "--eval-data")):
        if f is not None and not os.path.isfile(f):
            raise bad_input(f"{what} {f}: no such file")

    from kbitcli.models.load import load_model

    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    if tokenizer is None:
        raise bad_input(f"{model_path}: has no tokenizer files; copy the original model's tokenizer into it")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.context > max_pos:
        raise bad_input(f"--context {cfg.context} is longer than the model's {max_pos} positions; use at most {max_pos}")
    names = select_targets(model, cfg.targets)
    blocks = load_blocks(data, tokenizer, cfg.context, "--data")
    eval_blocks = load_blocks(eval_data, tokenizer, cfg.context, "--eval-data") if eval_data else None
    data_sha = sha256_file(data)
    base = os.path.abspath(model_path)
    loras = attach_lora(model, names, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.seed)
    optimizer = train.make_optimizer(loras, cfg)
    start_step, eval_before, resumed_from = 0, None, None
    if resume:
        step, path = checkpoint.list_checkpoints(out)[-1]
        step, info, tensors = checkpoint.load(path)
        check_resume(info, cfg, data_sha, base, path)
        if step > cfg.steps:
            raise bad_input(f"{path}: is at step {step}, past --steps {cfg.steps}; ask for at least {step} steps")
        checkpoint.restore(tensors, loras, optimizer, path)
        start_step, eval_before, resumed_from = step, info.get("eval_loss_before"), path
    else:
        torch.manual_seed(cfg.seed)  # dropout masks
    # ---- every input is good: from here on, OUT is written -------------------------------------------------
    if not resume and os.path.lexists(out):
        shutil.rmtree(out) if os.path.isdir(out) and not os.path.islink(out) else os.remove(out)
    os.makedirs(out, exist_ok=True)
    for folder in (out, os.path.join(out, checkpoint.FOLDER)):  # half-written files of a killed earlier run
        remove_stale(folder)
    log_path = os.path.join(out, LOG_FILE)
    kept = [r for r in curve.read_log(log_path) if r.get("step", 0) <= start_step] if resume else []
    with open(log_path + ".tmp", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(log_path + ".tmp", log_path)
    trainable = sum(p.numel() for lo in loras.values() for p in (lo.lora_A, lo.lora_B))
    run = {"status": "running", "model": base, "data": os.path.abspath(data), "data_sha256": data_sha,
           "eval_data": os.path.abspath(eval_data) if eval_data else None, "config": cfg.as_dict(),
           "targets": names, "trainable_params": trainable, "resumed_from": resumed_from}
    write_json(os.path.join(out, RUN_FILE), run)

    if eval_blocks is not None and eval_before is None:
        progress.note(f"eval before training: {eval_blocks.numel():,} tokens")
        try:
            eval_before = train.evaluate(model, eval_blocks, cfg.batch_size, device)
        except KeyboardInterrupt:
            write_json(os.path.join(out, RUN_FILE), {**run, "status": "interrupted", "step": start_step})
            raise KbitError(f"interrupted before the first step; {out} has no checkpoint: run again with --force",
                            exit_code=1) from None
        _append(log_path, {"step": start_step, "eval_loss": eval_before})
    info = {"config": cfg.as_dict(), "data_sha256": data_sha, "base": base, "eval_loss_before": eval_before}

    tokens, seconds, first_loss, last_loss, step = 0, 0.0, None, None, start_step
    progress.start(cfg.steps, start_step)
    interrupted, diverged = False, None
    try:
        with StopFlag() as stop:
            try:
                for rec in train.steps(model, loras, optimizer, blocks, cfg, start_step, device):
                    step = rec["step"]
                    tokens += rec["tokens"]
                    seconds += rec["seconds"]
                    first_loss = rec["loss"] if first_loss is None else first_loss
                    last_loss = rec["loss"]
                    tps = rec["tokens"] / rec["seconds"]
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        _append(log_path, {"step": step, "loss": rec["loss"], "lr": rec["lr"],
                                           "grad_norm": rec["grad_norm"], "tokens_per_s": round(tps, 1)})
                    progress.update(step, rec["loss"], tps)
                    if on_step is not None:
                        on_step(rec)
                    if eval_blocks is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        loss = train.evaluate(model, eval_blocks, cfg.batch_size, device)
                        _append(log_path, {"step": step, "eval_loss": loss})
                    if stop.set:
                        interrupted = True
                        break
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                        checkpoint.save(out, step, loras, optimizer, info)
            except train.Diverged as d:
                diverged = d
    finally:
        progress.stop()
    if diverged is not None:
        _diverged(diverged, out, run, log_path, cfg)
    if interrupted or step < cfg.steps:
        path = checkpoint.save(out, step, loras, optimizer, info)
        write_json(os.path.join(out, RUN_FILE), {**run, "status": "interrupted", "step": step})
        raise KbitError(f"interrupted at step {step}/{cfg.steps}; checkpoint saved to {path}; "
                        f"run the same command with --resume to continue", exit_code=1)

    try:
        return _finish(model, loras, optimizer, cfg, out, run, info, model_path, eval_blocks, eval_before,
                       merge, merge_dtype, dtype, device, progress, start_step,
                       dict(tokens=tokens, seconds=seconds, first_loss=first_loss, last_loss=last_loss, t_start=t_start))
    except KeyboardInterrupt:
        raise KbitError(f"interrupted after training; the final checkpoint is in {out}/{checkpoint.FOLDER}; "
                        "run the same command with --resume to write the outputs", exit_code=1) from None


def _diverged(d, out: str, run: dict, log_path: str, cfg: TrainConfig) -> None:
    """Stop at the first non-finite loss, gradient or weight: nothing more is saved (the checkpoints on disk
    are from good steps), the run file says so, exit 1 with what to change."""
    _append(log_path, {"step": d.step, "diverged": d.what, "value": str(d.value)})
    write_json(os.path.join(out, RUN_FILE), {**run, "status": "diverged", "step": d.step - 1, "diverged": str(d)})
    saved = checkpoint.list_checkpoints(out)
    last = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint was saved before it"
    raise KbitError(f"training diverged at step {d.step}: {d.what} is {d.value}; stopped without writing the "
                    f"adapter ({last}); lower --lr (it was {cfg.lr:g}) or set --grad-clip, and start over with --force",
                    exit_code=1)


def _finish(model, loras, optimizer, cfg, out, run, info, model_path, eval_blocks, eval_before, merge, merge_dtype,
            dtype, device, progress, start_step, stats) -> dict:
    checkpoint.save(out, cfg.steps, loras, optimizer, info)
    peft_io.save_adapter(out, loras, cfg, os.path.abspath(model_path), {"kbit.steps": cfg.steps})
    eval_after = train.evaluate(model, eval_blocks, cfg.batch_size, device) if eval_blocks is not None else None
    log_path = os.path.join(out, LOG_FILE)
    if eval_after is not None:
        _append(log_path, {"step": cfg.steps, "eval_loss": eval_after})
    curve.plot_loss(curve.read_log(log_path), os.path.join(out, PLOT_FILE),
                    f"LoRA r={cfg.rank} on {os.path.basename(os.path.abspath(model_path))}")
    merged = {}
    if merge is not None:
        from kbitcli.finetune.merge import merge as do_merge

        dst = os.path.join(out, f"merged-{merge}")
        progress.note(f"merging the adapter into {dst}")
        training = {"steps": cfg.steps, "rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora,
                    "targets": len(loras), "data": {"path": run["data"], "sha256": run["data_sha256"]}}
        merged = do_merge(model_path, out, dst, merge, dtype=merge_dtype, training=training, force=True)
        if eval_blocks is not None:
            from kbitcli.models.load import load_model

            m, _ = load_model(dst, dtype=dtype, device=device, tokenizer=False)
            merged["eval_loss"] = train.evaluate(m, eval_blocks, cfg.batch_size, device)
            del m
            curve.plot_loss(curve.read_log(log_path), os.path.join(out, PLOT_FILE),  # with the merged model's loss
                            f"LoRA r={cfg.rank} on {os.path.basename(os.path.abspath(model_path))}",
                            merged={merge: merged}, step=cfg.steps)
    summary = {
        "model": run["model"], "out": os.path.abspath(out), "steps": cfg.steps, "start_step": start_step,
        "resumed_from": run["resumed_from"], "targets": len(loras), "trainable_params": run["trainable_params"],
        "rank": cfg.rank, "alpha": cfg.alpha, "scaling": cfg.scaling, "context": cfg.context, "batch_size": cfg.batch_size,
        "tokens_trained": stats["tokens"], "train_seconds": round(stats["seconds"], 3),
        "tokens_per_s": round(stats["tokens"] / stats["seconds"], 1) if stats["seconds"] else None,
        "train_loss_first": stats["first_loss"], "train_loss_last": stats["last_loss"],
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "eval_tokens": int(eval_blocks.numel()) if eval_blocks is not None else None,
        "merged": {merge: merged} if merge else {}, "peak_rss_mb": round(peak_rss_mb(), 1),
        "seconds": round(time.time() - stats["t_start"], 3),
        "files": sorted(os.listdir(out)),
    }
    write_json(os.path.join(out, RUN_FILE), {**run, "status": "done", "summary": summary})
    return summary
