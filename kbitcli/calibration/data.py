"""Calibration text -> token windows: plain text or JSONL with a `text` field, tokenized with the model's own
tokenizer, cut into windows of `seq_len` tokens (each starting with BOS when the tokenizer has one), and a
sample of windows drawn as a pure function of the seed (the same file, tokens and seed give the same sample).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch

from kbitcli.errors import bad_input

DEFAULT_TOKENS = 16384
DEFAULT_SEQ = 512


@dataclass
class Calibration:
    """What the user asked for: --calib FILE [--calib-tokens N] [--seed S] [--damp D] [--act-order]."""

    path: str
    tokens: int = DEFAULT_TOKENS
    seed: int = 0
    damp: float = 0.01
    act_order: bool = True  # GPTQ columns by descending E[x^2]: halved SmolLM2's loss gap (docs/CALIBRATION.md)
    seq_len: int | None = None  # default: min(512, the model's positions)
    true_sequential: bool = True  # calibrate q/k/v, then o, then gate/up, then down, each on quantized inputs
    asymmetric: bool = False  # GPTQ targets the dense model's layer outputs (GPTAQ), not the quantized stream's
    refine: int = 1  # coordinate-descent sweeps after GPTQ (core/gptq.coordinate_descent); 0: plain GPTQ

    def check(self) -> None:
        if not os.path.isfile(self.path):
            raise bad_input(f"{self.path}: calibration text not found; pass --calib with a UTF-8 text or JSONL file")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 16:
            raise bad_input(f"--calib-tokens {self.tokens!r}: must be an integer of at least 16")
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and 0 < self.damp <= 1):
            raise bad_input(f"--damp {self.damp!r}: must be a number in (0, 1], e.g. 0.01")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or not 0 <= self.refine <= 8:
            raise bad_input(f"refine {self.refine!r}: must be an integer from 0 (plain GPTQ) to 8 sweeps")
        if self.seq_len is not None and self.seq_len < 2:
            raise bad_input(f"--calib-seq {self.seq_len}: must be at least 2 tokens")

    def record(self, used_tokens: int, windows: int, seq_len: int) -> dict:
        """What the manifest keeps, so the run can be reproduced and audited."""
        with open(self.path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        return {"file": os.path.basename(self.path), "sha256": digest, "tokens_asked": self.tokens,
                "tokens_used": used_tokens, "windows": windows, "seq_len": seq_len, "seed": self.seed,
                "damp": self.damp, "act_order": self.act_order, "true_sequential": self.true_sequential, "asymmetric": self.asymmetric,
                "refine": self.refine}


def read_calibration_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
    except UnicodeDecodeError as e:
        raise bad_input(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    if lines and (path.endswith(".jsonl") or all(ln.lstrip().startswith("{") for ln in lines[:5])):
        texts = []
        for i, ln in enumerate(lines):
            try:
                obj = json.loads(ln)
            except ValueError:
                raise bad_input(f"{path}:{i + 1}: not a JSON object; JSONL calibration needs one {{\"text\": ...}} per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise bad_input(f"{path}:{i + 1}: no string field 'text'; JSONL calibration needs {{\"text\": ...}} per line")
            texts.append(obj["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise bad_input(f"{path}: calibration text is empty; give it some text from the model's domain")
    return raw


def calibration_windows(tokenizer, calib: Calibration, seq_len: int) -> torch.Tensor:
    """[windows, seq_len] token ids: ceil(tokens / seq_len) windows drawn without replacement by the seed."""
    text = read_calibration_text(calib.path).replace("<|endoftext|>", "\n\n")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no "longer than max length" warning: it is cut into windows
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    available = len(ids) // body
    want = math.ceil(calib.tokens / seq_len)
    if available < want:
        raise bad_input(f"{calib.path}: gives {len(ids):,} tokens ({available} windows of {seq_len}), fewer than "
                        f"--calib-tokens {calib.tokens:,} asks for; use --calib-tokens {max(16, available * seq_len)} "
                        "or a longer text")
    g = torch.Generator().manual_seed(calib.seed)
    pick = torch.randperm(available, generator=g)[:want].sort().values
    windows = torch.tensor(ids[: available * body]).view(available, body)[pick]
    if bos is not None:
        windows = torch.cat([torch.full((want, 1), bos), windows], dim=1)
    return windows
