"""bench speed: encode/decode throughput, and k-bit vs dense forward latency and memory, side by side in one run.

MODEL is a dense folder (encoded here with the recipe) or a kbit folder (decoded here to get its dense twin).
Then the k-bit model, the dense one (at --compute-dtype) and the dense one at bf16 are loaded in this process
and timed alternately, run by run, so load on the machine hits all alike; each number is the median of `runs`:
  - generate: greedy batch-1 generation of `generate_tokens` tokens (KV cache on), tokens/s: the headline, what
    `kbit generate` feels (causal LMs only);
  - forward: one forward of batch x seq random tokens without cache (seq 1 by default: one decode step);
  - prefill: one forward of `prefill` tokens (0 skips it). Memory is reported twice:
the bytes of the model's tensors (each tensor once; what the weights really occupy), and the growth of a
fresh process's RSS while it loads the model, reads every tensor once and runs one short forward (what
the OS sees, allocator slack and activations included; reading every tensor pages in mmap-backed ones).
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time

import torch

from kbitcli.core import matvec
from kbitcli.errors import bad_input
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.formats.registry import detect
from kbitcli.progress import NullProgress
from kbitcli.recipes import Recipe

MB = 1e6


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _rss_of_load(path: str, dtype: str | None, threads: int | None) -> dict:
    """Run in a fresh process: RSS growth while loading `path` (imports done first, so they do not count)."""
    import psutil

    from kbitcli.hf import model_class, read_config
    from kbitcli.models.load import kbit_modules, load_model, weight_memory

    if threads:
        torch.set_num_threads(threads)
    model_class(read_config(path)[0])  # import the architecture's module before measuring
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    model, _ = load_model(path, dtype=dtype, tokenizer=False)
    gc.collect()
    loaded = proc.memory_info().rss
    # read every tensor once, then run one short forward: tensors may still be untouched mmaps of the file
    # (a forward alone reads only a few rows of an embedding), and the forward adds the allocator's share
    with torch.inference_mode():
        for t in list(model.parameters()) + list(model.buffers()):
            t.float().sum() if t.is_floating_point() else t.sum()
        model(**example_inputs(model, 1, 8))
    gc.collect()
    after = proc.memory_info().rss
    return {"rss_before": before, "rss_loaded": loaded, "rss_after_forward": after, "rss_delta": after - before,
            "weight_bytes": weight_memory(model)["total_bytes"], "kbit_modules": len(kbit_modules(model))}


def rss_of_load(path: str, dtype: str | None, threads: int | None) -> dict:
    # fork: the child starts with torch and transformers already imported (spawn would re-import: ~10 s)
    from kbitcli.hf import model_class, read_config

    model_class(read_config(path)[0])  # import the architecture here, once, so a forked child need not
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_rss_of_load, path, dtype, threads).result()


def example_inputs(model, batch: int, seq: int, seed: int = 0, flag: str = "--seq") -> dict:
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and seq > limit:
        raise bad_input(f"{flag} {seq} is longer than the model's {limit} positions; use {flag} {limit} or less")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, cfg.vocab_size - 1), cfg.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model, "can_generate", lambda: False)():
        inputs["use_cache"] = False
    return inputs


def time_forwards(models: dict, inputs: dict, runs: int, warmup: int, progress) -> dict[str, list[float]]:
    """Seconds per forward for each model, interleaved run by run."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(**inputs)
        for i in range(runs):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - t0)
            progress.advance(f"forward {i + 1}/{runs}", 0)
    return times


def time_generate(models: dict, tokens: int, runs: int, warmup: int, progress, prompt_len: int = 8) -> dict[str, list[float]]:
    """Tokens per second of greedy batch-1 generation (what `kbit generate` feels: one token per forward, KV
    cache on) for each model, interleaved run by run; the prompt is `prompt_len` fixed random ids."""
    ids = example_inputs(next(iter(models.values())), 1, prompt_len, seed=1)["input_ids"]
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    out = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m.generate(ids, **dict(kw, max_new_tokens=2, min_new_tokens=2))
        for i in range(runs):
            for name, m in models.items():
                t0 = time.perf_counter()
                m.generate(ids, **kw)
                out[name].append(tokens / (time.perf_counter() - t0))
            progress.advance(f"generate {i + 1}/{runs}", 0)
    return out


def summarize(times: dict[str, list[float]], unit: str, scale: float = 1.0) -> dict:
    """Medians per model (x scale, rounded), and each model's median as a ratio of dense fp32's."""
    med = {name: statistics.median(v) * scale for name, v in times.items()}
    return {unit: {name: round(v, 3) for name, v in med.items()},
            "vs_dense": {name: round(v / med["dense"], 3) for name, v in med.items()}}


def quantized_module_bytes(dense, kbit) -> dict:
    """Bytes of the quantized modules: in the k-bit model, in the dense model, and at bf16."""
    from kbitcli.models.load import kbit_modules

    mods = kbit_modules(kbit)
    storages = {}  # each tensor once: modules share their codebook and byte table
    for m in mods.values():
        for t in list(m.buffers()) + list(m.parameters()):
            storages[t.data_ptr()] = t.numel() * t.element_size()
    kb = sum(storages.values())
    dense_mods = dict(dense.named_modules())
    db = 0
    for name in mods:
        d = dense_mods.get(name)
        if d is not None:
            db += sum(p.numel() * p.element_size() for p in d.parameters(recurse=False))
    params = sum(m.in_features * m.out_features for m in mods.values())
    bits = [m.bits_per_param() for m in mods.values()]
    return {"modules": len(mods), "params": params, "dense_bytes": db, "kbit_bytes": kb, "bf16_bytes": 2 * params,
            "ratio": kb / db if db else None, "ratio_vs_bf16": kb / (2 * params) if params else None,
            "stored_bits_per_param": sum(b * (m.in_features * m.out_features) for b, m in zip(bits, mods.values())) / params
            if params else None}


def bench_speed(model_path: str, recipe: Recipe | None = None, *, batch: int = 1, seq: int = 1, runs: int = 10,
                warmup: int = 2, dtype: str | None = "fp32", threads: int | None = None, rss: bool = True,
                generate_tokens: int = 32, prefill: int = 128, progress=None) -> dict:
    from kbitcli.decode import decode
    from kbitcli.encode import encode
    from kbitcli.models.load import load_model, weight_memory

    progress = progress or NullProgress()
    if not os.path.isdir(model_path):
        raise bad_input(f"{model_path}: not a model folder; bench speed needs a Hugging Face or kbit model folder")
    if batch < 1 or seq < 1 or runs < 1 or warmup < 0:
        raise bad_input("--batch, --seq and --runs must be at least 1 (and --warmup at least 0)")
    if generate_tokens < 0 or prefill < 0:
        raise bad_input("--generate-tokens and --prefill must be 0 (skip) or more")
    if threads:
        torch.set_num_threads(threads)
    is_kbit = detect(model_path) == "kbit"
    if is_kbit and recipe is not None:
        raise bad_input(f"{model_path} is already a kbit checkpoint; drop the encode options, or pass the dense original")
    result = {"model": model_path, "batch": batch, "seq": seq, "runs": runs, "dtype": dtype or "stored",
              "threads": torch.get_num_threads(), "kernel": matvec.describe()}
    steps = (0 if is_kbit else 1) + 1 + (2 if rss else 0) + 1 + runs * (1 + bool(prefill) + bool(generate_tokens))
    progress.start("bench speed", 0, steps)
    work = tempfile.mkdtemp(prefix="kbit-speed-")
    try:
        if is_kbit:
            kbit_path, result["encode"] = model_path, None
        else:
            kbit_path = os.path.join(work, "kbit")
            t0 = time.perf_counter()
            summary = encode(model_path, kbit_path, recipe or Recipe())
            sec = time.perf_counter() - t0
            result["encode"] = {"seconds": round(sec, 4), "bytes_in": summary["bytes_in"], "bytes_out": summary["bytes_out"],
                                "mb_per_s": round(summary["bytes_in"] / MB / sec, 2)}
            progress.advance("encode", 0)
        dense_path = os.path.join(work, "dense")
        t0 = time.perf_counter()
        summary = decode(kbit_path, dense_path)
        sec = time.perf_counter() - t0
        result["decode"] = {"seconds": round(sec, 4), "bytes_in": folder_bytes(kbit_path), "bytes_out": summary["bytes_out"],
                            "mb_per_s": round(summary["bytes_out"] / MB / sec, 2)}
        progress.advance("decode", 0)
        if not is_kbit:
            dense_path = model_path  # the original is the baseline; the decoded copy only timed decode
        result["quantization"] = (KbitCheckpoint(kbit_path).config or {}).get("quantization_config")

        if rss:  # each load in its own fresh process, so neither profits from memory the other freed
            r_dense = rss_of_load(dense_path, dtype, threads)
            progress.advance("rss dense", 0)
            r_kbit = rss_of_load(kbit_path, dtype, threads)
            progress.advance("rss kbit", 0)
            result["rss"] = {"dense_delta": r_dense["rss_delta"], "kbit_delta": r_kbit["rss_delta"],
                             "dense_delta_before_forward": r_dense["rss_loaded"] - r_dense["rss_before"],
                             "kbit_delta_before_forward": r_kbit["rss_loaded"] - r_kbit["rss_before"],
                             "ratio": r_kbit["rss_delta"] / r_dense["rss_delta"] if r_dense["rss_delta"] > 0 else None}

        dense, _ = load_model(dense_path, dtype=dtype, tokenizer=False)
        kbit, _ = load_model(kbit_path, dtype=dtype, tokenizer=False)
        progress.advance("load", 0)
        wd, wk = weight_memory(dense)["total_bytes"], weight_memory(kbit)["total_bytes"]
        result["memory"] = {"dense_weight_bytes": wd, "kbit_weight_bytes": wk, "ratio": wk / wd,
                            "quantized_modules": quantized_module_bytes(dense, kbit)}
        inputs = example_inputs(dense, batch, seq)
        prefill_inputs = example_inputs(dense, 1, prefill, flag="--prefill") if prefill else None  # checks --prefill fits, before work
        models = {"dense": dense, "kbit": kbit}
        if (dtype or "").lower() not in ("bf16", "bfloat16"):  # the other dense baseline users reach for
            models = {"dense": dense, "dense_bf16": load_model(dense_path, dtype="bf16", tokenizer=False)[0], "kbit": kbit}
        times = time_forwards(models, inputs, runs, warmup, progress)
        md, mk = statistics.median(times["dense"]), statistics.median(times["kbit"])
        result["forward"] = {"dense_ms": round(md * 1e3, 3), "kbit_ms": round(mk * 1e3, 3), "ratio": round(mk / md, 3),
                             "dense_runs_ms": [round(t * 1e3, 3) for t in times["dense"]],
                             "kbit_runs_ms": [round(t * 1e3, 3) for t in times["kbit"]],
                             "tokens_per_s": {"dense": round(batch * seq / md, 1), "kbit": round(batch * seq / mk, 1)},
                             **summarize(times, "ms", 1e3)}
        if prefill:
            result["prefill"] = {"tokens": prefill, **summarize(time_forwards(models, prefill_inputs, runs, warmup, progress),
                                                                 "ms", 1e3)}
        generative = getattr(dense, "can_generate", lambda: False)()
        if generate_tokens and generative:
            result["generate"] = {"tokens": generate_tokens,
                                  **summarize(time_generate(models, generate_tokens, runs, warmup, progress), "tokens_per_s")}
    finally:
        progress.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result
