"""Evaluation text and scoring shared by `bench ppl` and `bench scaling`.

Causal LMs are scored on token windows: the text is either split into documents (each = BOS + tokens, the
way the TinyStories asset README measured 1.2346 nats/token for stories260K) or kept as one stream, and
each document/stream is cut into windows of `context` tokens every `stride` tokens. Only tokens not scored
by an earlier window are scored (Hugging Face's sliding-window perplexity recipe), so every target token is
counted exactly once and, with stride < context, gets up to context - stride tokens of left context.

Encoders (BERT, MiniLM) are compared on the mean-pooled last hidden state of each non-empty line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from kbitcli.errors import bad_input

DOC_SEPARATOR = "<|endoftext|>"  # TinyStories / GPT-2 end of document
LOGIT_BUDGET = 1 << 24  # floats of logits per batch (64 MB fp32): bounds memory whatever the vocabulary
MAX_BATCH = 16


@dataclass
class Window:
    ids: list[int]
    score_from: int  # positions j >= score_from (j >= 1) predict ids[j] from ids[:j] and are scored

    @property
    def scored(self) -> int:
        return len(self.ids) - self.score_from


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise bad_input(f"{path}: text file not found; pass --text with a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise bad_input(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise bad_input(f"{path}: text file is empty; give it some text to evaluate on")
    return text


def model_kind(path: str) -> str:
    """'causal' when config.json names a *ForCausalLM / *LMHeadModel architecture, else 'encoder'."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise bad_input(f"{path}: no config.json; bench needs a model folder (dense Hugging Face or kbit)")
    with open(cfg) as fh:
        archs = json.load(fh).get("architectures") or []
    return "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"


def max_positions(path: str) -> int | None:
    """The longest input the model's config allows (None when it does not say)."""
    with open(os.path.join(path, "config.json")) as fh:
        cfg = json.load(fh)
    cfg = {**cfg.get("text_config", {}), **cfg}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(context: int | None, stride: int | None, limit: int | None, default: int = 512) -> tuple[int, int]:
    """--context / --stride, checked against the model's positions; context defaults to min(default, limit)."""
    if context is None:
        context = min(default, limit) if limit else default
    if context < 2:
        raise bad_input(f"--context {context}: needs at least 2 tokens")
    if limit is not None and context > limit:
        raise bad_input(f"--context {context} is longer than the model's {limit} positions; use --context {limit}")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise bad_input(f"--stride {stride}: must be from 1 to --context ({context})")
    return context, stride


def resolve_split(text: str, split_on: str | None) -> str | None:
    """'auto': split on <|endoftext|> when the text has it; 'none': one stream; anything else: that separator."""
    if split_on is None or split_on == "none":
        return None
    if split_on == "auto":
        return DOC_SEPARATOR if DOC_SEPARATOR in text else None
    return split_on.encode().decode("unicode_escape")  # so --split-on '\n\n' means two newlines


def _windows(ids: list[int], context: int, stride: int) -> list[Window]:
    out, prev_end = [], 0
    for begin in range(0, max(1, len(ids) - 1), stride):
        end = min(begin + context, len(ids))
        w = ids[begin:end]
        if len(w) >= 2 and end > prev_end:
            out.append(Window(w, max(1, len(w) - (end - prev_end))))
        prev_end = end
        if end == len(ids):
            break
    return out


def causal_windows(tokenizer, text: str, context: int, stride: int, split_on: str | None = "auto",
                   max_tokens: int | None = None) -> tuple[list[Window], dict]:
    """Token windows to score, and a description of how they were made (for the report)."""
    sep = resolve_split(text, split_on)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    parts = [p.strip() for p in text.split(sep)] if sep else [text]
    docs = []
    budget = max_tokens
    for p in parts:
        if not p:
            continue
        ids = ([prefix] if prefix is not None else []) + tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"]
        if budget is not None:
            ids = ids[: budget + 1]
            budget -= max(0, len(ids) - 1)
        if len(ids) >= 2:
            docs.append(ids)
        if budget is not None and budget <= 0:
            break
    windows = [w for d in docs for w in _windows(d, context, stride)]
    if not windows:
        raise bad_input("the text gives no token to score (it needs at least two tokens); use a longer text")
    how = {"mode": "documents" if sep else "stream", "separator": sep, "documents": len(docs),
           "prefix_token": prefix, "windows": len(windows)}
    return windows, how


def batches(windows: list[Window], vocab: int, max_batch: int = MAX_BATCH):
    """Windows of similar length together (little padding), as many per batch as the logit budget allows."""
    ordered = sorted(windows, key=lambda w: len(w.ids), reverse=True)
    per = max(1, min(max_batch, LOGIT_BUDGET // max(1, vocab * len(ordered[0].ids))))
    for i in range(0, len(ordered), per):
        yield ordered[i : i + per]


@torch.no_grad()
def scored_logprobs(model, batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probabilities [n_scored, vocab] (fp32) at the scored positions of a batch, and their targets."""
    T = max(len(w.ids) for w in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, w in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
        ids[i, : len(w.ids)] = torch.tensor(w.ids)
        mask[i, : len(w.ids)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    rows, targets = [], []
    for i, w in enumerate(batch):
        rows.append(logits[i, w.score_from - 1 : len(w.ids) - 1].float())
        targets.append(ids[i, w.score_from : len(w.ids)])
    return torch.log_softmax(torch.cat(rows), dim=-1).cpu(), torch.cat(targets)


def vocab_size(model) -> int:
    head = model.get_output_embeddings()  # a k-bit lm_head (KbitLinear) has out_features but no .weight
    return int(head.out_features) if head is not None else int(model.config.vocab_size)


class CausalReference:
    """The dense model's log-probabilities on a fixed set of windows, computed once and compared with any
    number of quantized models (kept in memory when they fit in `cache_bytes`, recomputed otherwise)."""

    def __init__(self, dense, windows: list[Window], cache_bytes: int = 1 << 30, progress=None):
        self.dense, self.windows = dense, windows
        self.batches = list(batches(windows, vocab_size(dense)))
        self.cache = [] if sum(w.scored for w in windows) * vocab_size(dense) * 4 <= cache_bytes else None
        self.nll_sum, self.tokens = 0.0, 0
        self.window_tokens = [w.scored for b in self.batches for w in b]  # in batch order
        self.window_nll: list[float] = []  # the dense model's summed nll per window, same order
        for i in range(len(self.batches)):  # baseline nll now; fills the cache when there is one
            lp, tgt = self._compute(i)
            sums = _window_sums(lp, tgt, self.batches[i])
            self.window_nll += sums
            self.nll_sum += sum(sums)
            self.tokens += tgt.numel()
            if self.cache is not None:
                self.cache.append((lp, tgt))
            if progress is not None:
                progress.advance(f"dense {self.tokens} tokens", 0)

    def _compute(self, i):
        return scored_logprobs(self.dense, self.batches[i])

    def logprobs(self, i):
        return self.cache[i] if self.cache is not None else self._compute(i)

    def baseline(self) -> dict:
        return {"nll": self.nll_sum / self.tokens, "ppl": math.exp(self.nll_sum / self.tokens)}

    def compare(self, quant, progress=None, per_window: bool = False) -> dict:
        """nll/ppl of `quant`, per token KL(dense || quant) (nats) and top-1 agreement with the dense model, and
        delta_nll (quant's nll - dense's) with its standard error over the windows (the noise of the scored text:
        windows, not tokens, are the independent draws). per_window: also each window's summed nll difference
        (`window_delta_nll`, in the order of `window_tokens`), so two configurations can be compared paired."""
        nll = kl = 0.0
        agree = n = 0
        wq: list[float] = []
        for i, b in enumerate(self.batches):
            lp_d, tgt = self.logprobs(i)
            lp_q, _ = scored_logprobs(quant, b)
            sums = _window_sums(lp_q, tgt, b)
            wq += sums
            nll += sum(sums)
            d, q = lp_d.double(), lp_q.double()  # float64 so a tiny KL is not swamped by rounding
            kl += (d.exp() * (d - q)).sum().item()
            agree += int((lp_d.argmax(-1) == lp_q.argmax(-1)).sum())
            n += tgt.numel()
            if progress is not None:
                progress.advance(f"k-bit {n} tokens", 0)
        diff = [a - b for a, b in zip(wq, self.window_nll)]
        out = {"nll": nll / n, "ppl": math.exp(nll / n), "kl_divergence": kl / n, "top1_agreement": agree / n,
               "delta_nll": sum(diff) / n, "delta_nll_se": ratio_se(diff, self.window_tokens)}
        if per_window:
            out["window_delta_nll"] = diff
        return out


def _window_sums(lp: torch.Tensor, tgt: torch.Tensor, batch: list[Window]) -> list[float]:
    """Summed nll of each window of a batch (rows of lp are the windows' scored positions, in order)."""
    tok = -lp.gather(1, tgt[:, None]).squeeze(1).double()
    return [float(t.sum()) for t in torch.split(tok, [w.scored for w in batch])]


def ratio_se(sums: list[float], counts: list[float]) -> float:
    """Standard error of sum(sums) / sum(counts), the windows being independent draws (the ratio estimator's
    linearised variance). counts: each window's scored tokens (the SE of a ΔNLL), or another configuration's
    per-window ΔNLL sums on the same windows (the paired SE of a ratio of two ΔNLLs). 0 with fewer than two
    windows: no spread to measure."""
    m = len(sums)
    if m < 2:
        return 0.0
    total = sum(counts)
    mean = sum(sums) / total
    var = sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) * m / (m - 1)
    return math.sqrt(var) / abs(total)


def encoder_lines(text: str, max_lines: int | None = None) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and ln != DOC_SEPARATOR]
    if max_lines is not None:
        lines = lines[:max_lines]
    if not lines:
        raise bad_input("the text has no non-empty line to embed; use a text with some lines")
    return lines


@torch.no_grad()
def embed(model, tokenizer, lines: list[str], context: int, batch: int = 32, progress=None) -> tuple[torch.Tensor, int]:
    """Mean-pooled last hidden states [n_lines, hidden] (fp32) and the number of (non-pad) tokens embedded."""
    out, tokens = [], 0
    device = next(model.parameters()).device
    for i in range(0, len(lines), batch):
        enc = tokenizer(lines[i : i + batch], padding=True, truncation=True, max_length=context, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        res = model(**enc, output_hidden_states=True)
        hidden = res.last_hidden_state if getattr(res, "last_hidden_state", None) is not None else res.hidden_states[-1]
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
        tokens += int(enc["attention_mask"].sum())
        if progress is not None:
            progress.advance(f"{min(i + batch, len(lines))} lines", 0)
    return torch.cat(out), tokens


def cosine_stats(ref: torch.Tensor, other: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(ref.double(), other.double(), dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}


def describe_tokenizer(tokenizer, path: str) -> str:
    # the folder's name, not its absolute path: reports are committed and shared
    return f"{type(tokenizer).__name__} from {os.path.basename(os.path.normpath(path))} (vocab {len(tokenizer)})"
