"""bench ppl: a dense model and its k-bit version on the same text.

Causal LMs: nll / perplexity of both on the same scored tokens, and per token KL(dense || k-bit) and top-1
agreement of the k-bit logits with the dense ones (what llama.cpp's --kl-divergence reports).
Encoders: cosine similarity of the mean-pooled embeddings of each line, k-bit vs dense.

A dense MODEL is encoded with the recipe into a temporary folder and that checkpoint is loaded with
`load_model` (k-bit layers, codes in memory). A k-bit MODEL is compared with its own decoded weights: the
baseline is then the dense model `kbit decode` gives, not the original the checkpoint was made from.
Both run in fp32 so the comparison measures the quantization and nothing else.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

from kbitcli.bench import evaluate as ev
from kbitcli.bench.error import is_quantized_checkpoint, open_weights, simulated_quantization
from kbitcli.errors import bad_input
from kbitcli.recipes import Recipe

DEFAULT_CONTEXT = 512


def quantized_bits(path: str) -> dict:
    from kbitcli.inspect import inspect

    info = inspect(path)
    return {"bits_per_param": info.get("bits_per_param_quantized"), "bits_per_param_model": info.get("bits_per_param_model")}


def bench_ppl(model_path: str, text_path: str, recipe: Recipe | None = None, *, context: int | None = None,
              stride: int | None = None, split_on: str | None = "auto", max_tokens: int | None = None,
              max_lines: int | None = None, simulate: bool = False, progress=None, baseline: str | None = None,
              calib=None) -> dict:
    """recipe None: the default recipe for a dense MODEL; must be None for an already k-bit MODEL.
    baseline: the dense original of an already quantized MODEL (kbit, bnb, compressed-tensors, GGUF, a merged
    finetune): the checkpoint is then scored against it, not against its own decoded weights.
    calib: a Calibration for encoding a dense MODEL (GPTQ / importance-weighted RTN)."""
    from kbitcli.decode import decode
    from kbitcli.encode import encode, plan_source
    from kbitcli.formats.source import open_source
    from kbitcli.models.load import load_model

    t0 = time.time()
    text = ev.read_text(text_path)
    if not os.path.isdir(model_path):
        raise bad_input(f"{model_path}: MODEL must be a model folder (config.json, weights, tokenizer)")
    kind = ev.model_kind(model_path)
    for name, v in (("--max-tokens", max_tokens), ("--max-lines", max_lines)):
        if v is not None and v < 1:
            raise bad_input(f"{name} {v}: must be at least 1")
    ctx, stride = ev.check_context(context, stride, ev.max_positions(model_path), DEFAULT_CONTEXT)
    already = is_quantized_checkpoint(model_path)
    if already and (recipe is not None or calib is not None):
        raise bad_input(f"{model_path} is already a k-bit checkpoint; encode options apply to a dense MODEL "
                        "(drop them, or point at the dense original)")
    if baseline is not None:
        if not already:
            raise bad_input(f"--baseline is for an already quantized MODEL; {model_path} is dense (it is its own baseline)")
        if not os.path.isdir(baseline) or is_quantized_checkpoint(baseline):
            raise bad_input(f"--baseline {baseline}: must be the dense original model folder")
    with tempfile.TemporaryDirectory(prefix="kbit-bench-ppl-") as tmp:
        if already and baseline is not None:
            dense, tok = load_model(baseline, dtype="fp32")
            quant, _ = load_model(model_path, dtype="fp32", tokenizer=False)
            bits, recipe_info, evaluation = quantized_bits(model_path), None, "kbit"
            baseline_info = {"source": "dense", "path": baseline}
        elif already:
            dense_path = os.path.join(tmp, "decoded")
            decode(model_path, dense_path, "fp32")
            dense, tok = load_model(dense_path, dtype="fp32")
            quant, _ = load_model(model_path, dtype="fp32", tokenizer=False)
            bits, recipe_info, evaluation = quantized_bits(model_path), None, "kbit"
            baseline_info = {"source": "decoded", "path": model_path,
                             "note": "baseline is the decoded k-bit checkpoint (kbit decode), not the original dense "
                                     "model; pass --baseline DENSE to score it against its original"}
        else:
            recipe = recipe or Recipe()
            dense, tok = load_model(model_path, dtype="fp32")
            plan = plan_source(open_source(model_path), recipe, calibrated=calib is not None)
            s = plan.summary()
            bits = {"bits_per_param": s["bits_per_param_quantized"], "bits_per_param_model": s["bits_per_param_model"]}
            recipe_info = recipe.settings()
            baseline_info = {"source": "dense", "path": model_path}
            if simulate and calib is not None:
                raise bad_input("--simulate quantizes with round-to-nearest only; drop it with --calib")
            if simulate:
                quant, evaluation = copy.deepcopy(dense), "simulated"
            else:
                kbit_path = os.path.join(tmp, "kbit")
                enc = encode(model_path, kbit_path, recipe, calib=calib)
                quant, _ = load_model(kbit_path, dtype="fp32", tokenizer=False)
                evaluation = "kbit"
                if enc.get("calibration"):
                    recipe_info = {**recipe_info, "calibration": enc["calibration"]}
        if tok is None:
            raise bad_input(f"{model_path}: no tokenizer files (tokenizer.json / tokenizer.model / vocab.txt) to read the text with")
        out = {"model": model_path, "kind": kind, "text": text_path, "context": ctx,
               "tokenizer": ev.describe_tokenizer(tok, model_path), "evaluation": evaluation}
        if evaluation == "simulated":
            with simulated_quantization(quant, open_weights(model_path), plan):
                result = _measure(kind, dense, quant, tok, text, ctx, stride, split_on, max_tokens, max_lines, progress)
        else:
            result = _measure(kind, dense, quant, tok, text, ctx, stride, split_on, max_tokens, max_lines, progress)
    base, q, extra = result
    out.update(extra)
    out["baseline"] = {**baseline_info, **base}
    out["quantized"] = {**q, **bits, "recipe": recipe_info}
    out["seconds"] = round(time.time() - t0, 3)
    return out


def _measure(kind, dense, quant, tok, text, ctx, stride, split_on, max_tokens, max_lines, progress):
    if kind == "causal":
        windows, how = ev.causal_windows(tok, text, ctx, stride, split_on, max_tokens)
        if progress is not None:
            progress.start("ppl", 0, 2 * len(list(ev.batches(windows, ev.vocab_size(dense)))))
        ref = ev.CausalReference(dense, windows, progress=progress)
        q = ref.compare(quant, progress)
        if progress is not None:
            progress.stop()
        return ref.baseline(), q, {"stride": stride, "tokens": ref.tokens, "tokenization": how}
    lines = ev.encoder_lines(text, max_lines)
    if progress is not None:
        progress.start("embed", 0, 2 * ((len(lines) + 31) // 32))
    ref, tokens = ev.embed(dense, tok, lines, ctx, progress=progress)
    emb, _ = ev.embed(quant, tok, lines, ctx, progress=progress)
    if progress is not None:
        progress.stop()
    return {}, ev.cosine_stats(ref, emb), {"tokens": tokens, "lines": len(lines),
                                            "tokenization": {"mode": "lines", "pooling": "mean"}}
