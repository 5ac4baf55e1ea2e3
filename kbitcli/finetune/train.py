"""The training loop: AdamW on the LoRA weights only, constant learning rate after a linear warmup, global
grad-norm clipping (QLoRA's recipe), next-token cross-entropy on fixed-length blocks.

It knows nothing about k bits, files or progress bars: `steps()` yields one record per optimizer step and
the caller (run.py) logs, evaluates, checkpoints and stops between steps. The same loop trains a plain
full-precision LoRA, which is what benchmarks/finetune_memory.py compares against.
"""

from __future__ import annotations

import time

import torch

from kbitcli.finetune.config import TrainConfig
from kbitcli.finetune.data import batch_indices
from kbitcli.finetune.lora import lora_parameters


class Diverged(Exception):
    """A step produced a NaN/Inf loss, gradient or weight. Raised before that step changes anything (or, for the
    weights, before anything is saved), so what is on disk is the last good state."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"step {step}: {what} is {value}")
        self.step, self.what, self.value = step, what, value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (1-based): linear warmup over warmup_steps, then constant."""
    w = cfg.warmup_steps
    return cfg.lr * min(1.0, step / w) if w > 0 else cfg.lr


def make_optimizer(loras: dict, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(lora_parameters(loras), lr=cfg.lr, weight_decay=cfg.weight_decay)


def block_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) over the batch's context - 1 predictions per block."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, device="cpu") -> float:
    """Mean NLL per predicted token over all blocks (every block predicts the same number of tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i: i + batch_size].to(device)
        total += float(block_loss(model, ids)) * ids.shape[0]
        count += ids.shape[0]
    model.train(was_training)
    return total / count


def steps(model, loras: dict, optimizer, blocks: torch.Tensor, cfg: TrainConfig, start_step: int = 0, device="cpu"):
    """Train from step start_step + 1 to cfg.steps, yielding {step, loss, lr, grad_norm, tokens, seconds}
    after each optimizer step. Stopping the iteration between steps leaves a consistent state."""
    params = lora_parameters(loras)
    model.train()
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = blocks[batch_indices(blocks.shape[0], cfg.batch_size, cfg.seed, step)].to(device)
        loss = block_loss(model, ids)
        if not torch.isfinite(loss):
            raise Diverged(step, "the loss", loss.item())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise Diverged(step, "the gradient norm", norm.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # a finite gradient times a huge lr can still overflow the weights; the adapter is small, so checking
        # every step costs nothing next to the forward pass
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise Diverged(step, "an adapter weight", float("nan"))
        yield {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": norm.item(), "tokens": ids.numel(),
               "seconds": time.perf_counter() - t0}
