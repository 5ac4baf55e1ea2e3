"""Finetuning settings: a plain YAML file (recipes/finetune-lora.yaml) that flags override key by key.

    rank: 16            # LoRA rank r (> 0)
    alpha: 32           # scaling = alpha / r   (rslora: alpha / sqrt(r))
    dropout: 0.05       # dropout on the adapter input only
    rslora: false
    targets: null       # patterns of modules to adapt; null = every quantized linear layer
    lr: 2.0e-4          # AdamW, constant after warmup (QLoRA's schedule)
    weight_decay: 0.0
    warmup: 0.03        # < 1: fraction of the steps; >= 1: a number of steps
    grad_clip: 0.3      # max global grad norm (QLoRA); 0 turns clipping off
    steps: 500
    batch_size: 8
    context: 256        # tokens per training block
    seed: 0
    eval_every: 100     # steps between evaluations on --eval-data (0: only before and after)
    save_every: 100     # steps between resume checkpoints (0: only at the end and on Ctrl-C)
    log_every: 1        # steps between train_log.jsonl lines

Every value is checked before any work is done; an unknown key or a bad value is a one-line error (exit 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace


from kbitcli.errors import bad_input
from kbitcli.recipes import compile_pattern, read_yaml


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False
    targets: tuple[str, ...] | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.03
    grad_clip: float = 0.3
    steps: int = 500
    batch_size: int = 8
    context: int = 256
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 1

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d


KEYS = {f.name for f in fields(TrainConfig)}
INTS = ("rank", "steps", "batch_size", "context", "seed", "eval_every", "save_every", "log_every")
FLOATS = ("alpha", "dropout", "lr", "weight_decay", "warmup", "grad_clip")
# what changes the trajectory of a run: --resume refuses a checkpoint made with other values of these
# (steps may grow: resuming with a larger --steps continues the same run further)
TRAJECTORY = ("rank", "alpha", "dropout", "rslora", "targets", "lr", "weight_decay", "warmup", "grad_clip",
              "batch_size", "context", "seed")


def check(cfg: TrainConfig, where: str) -> TrainConfig:
    for k in INTS:
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_input(f"{where}: {k} must be an integer, got {v!r}")
    for k in FLOATS:
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_input(f"{where}: {k} must be a number, got {v!r}")
        if not math.isfinite(v):  # NaN passes every comparison below, and an infinite lr trains to NaN
            raise bad_input(f"{where}: {k} must be a finite number, got {v}")
    if not isinstance(cfg.rslora, bool):
        raise bad_input(f"{where}: rslora must be true or false, got {cfg.rslora!r}")
    if cfg.rank <= 0:
        raise bad_input(f"{where}: rank must be a positive integer (e.g. 8, 16, 64), got {cfg.rank}")
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "context": cfg.context, "lr": cfg.lr,
                "alpha": cfg.alpha, "log_every": cfg.log_every}
    for k, v in positive.items():
        if v <= 0:
            raise bad_input(f"{where}: {k} must be > 0, got {v}")
    if cfg.context < 2:
        raise bad_input(f"{where}: context must be at least 2 tokens, got {cfg.context}")
    if not 0 <= cfg.dropout < 1:
        raise bad_input(f"{where}: dropout must be in [0, 1), got {cfg.dropout}")
    for k in ("weight_decay", "grad_clip", "warmup", "eval_every", "save_every", "seed"):
        if getattr(cfg, k) < 0:
            raise bad_input(f"{where}: {k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.warmup >= 1 and cfg.warmup != int(cfg.warmup):
        raise bad_input(f"{where}: warmup is a fraction of the steps (< 1) or a whole number of steps, got {cfg.warmup}")
    if cfg.targets is not None:
        if not cfg.targets:
            raise bad_input(f"{where}: targets is empty; leave it out to adapt every quantized linear layer")
        for p in cfg.targets:
            if not isinstance(p, str) or not p:
                raise bad_input(f"{where}: targets must be a list of patterns (globs or 're:' regexes)")
            compile_pattern(p, where)
    return cfg


def from_dict(data, where: str) -> TrainConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise bad_input(f"{where}: a finetune recipe is a YAML mapping of {', '.join(sorted(KEYS))}")
    unknown = set(data) - KEYS
    if unknown:
        raise bad_input(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; valid keys: {', '.join(sorted(KEYS))}")
    data = dict(data)
    if isinstance(data.get("targets"), str):
        data["targets"] = [data["targets"]]
    if data.get("targets") is not None:
        if not isinstance(data["targets"], list):
            raise bad_input(f"{where}: targets must be a list of patterns (globs or 're:' regexes)")
        data["targets"] = tuple(data["targets"])
    return check(TrainConfig(**data), where)


def load_config(path: str | None) -> TrainConfig:
    if path is None:
        return TrainConfig()
    return from_dict(read_yaml(path, "finetune recipe", "recipes/finetune-lora.yaml"), path)


def with_flags(cfg: TrainConfig, **flags) -> TrainConfig:
    """Flags that were given (not None) replace the recipe's values; --targets replaces the recipe's targets."""
    given = {k: v for k, v in flags.items() if v is not None and not (k == "targets" and not v)}
    unknown = set(given) - KEYS
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    if "targets" in given:
        given["targets"] = tuple(given["targets"])
    return check(replace(cfg, **given), "flags")
