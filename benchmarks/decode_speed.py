"""Batch-1 decode tokens/s of k-bit models vs dense fp32 and bf16, fused kernel on and off, in one run.

    .venv/bin/python benchmarks/decode_speed.py --model /work/smollm2-dense [--model kbitcli/assets/stories260K]
        [--tokens 32] [--rounds 3] [--threads N] [--prefill 128] [--json]

For each dense model folder: encodes nf4 (recipes/llama-nf4.yaml), int4 (k=4 int B=64), int8 (recipes/int8.yaml)
and 3-bit (k=3 nf B=64 + double quant) into a temporary folder, loads them all plus the dense model at fp32 and
bf16 into this process, then times, round-robin so load on the machine hits all alike:
  - decode: greedy generation of --tokens new tokens after a short prompt (`kbit generate`'s loop: prefill of
    the prompt included), tokens/s; every k-bit model twice, with the fused kernel (after) and with
    KBIT_KERNEL=0 (before: dequantize by slabs + matmul);
  - prefill: one forward of --prefill tokens, ms, kernel on and off;
  - kernel bandwidth: every KbitLinear of the nf4 / int8 model once at batch 1, bytes of packed codes +
    scales read per second, against torch's copy of a 256 MB tensor (bytes read per second) in the same run.
Medians over --rounds. Ratios are against dense fp32 of the same round set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kbitcli.core import matvec  # noqa: E402
from kbitcli.encode import encode  # noqa: E402
from kbitcli.models.load import kbit_modules, load_model  # noqa: E402
from kbitcli.recipes import Recipe, load_recipe  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPT = "The capital of France is"


def configs() -> dict[str, Recipe]:
    return {"nf4": load_recipe(os.path.join(ROOT, "recipes", "llama-nf4.yaml")),
            "int4": Recipe(bits=4, block_size=64, dtype="int"),
            "int8": load_recipe(os.path.join(ROOT, "recipes", "int8.yaml")),
            "3bit": Recipe(bits=3, block_size=64, dtype="nf", double_quant=True)}


class kernel_switch:
    """KBIT_KERNEL=0 inside the block when off (KbitLinear reads it on every forward)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = os.environ.get("KBIT_KERNEL")
        os.environ["KBIT_KERNEL"] = "1" if self.on else "0"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("KBIT_KERNEL", None)
        else:
            os.environ["KBIT_KERNEL"] = self.old


def decode_seconds(model, ids, tokens: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0)
        sec = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + tokens
    return sec


def prefill_seconds(model, n: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t0


def kernel_bandwidth(model, lib, rounds: int) -> dict:
    mods = list(kbit_modules(model).values())
    packed = [(m.packed_weight(), torch.randn(1, m.in_features)) for m in mods]
    nbytes = sum(m.codes.numel() + m.scales.numel() * m.scales.element_size() for m in mods)
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        for pw, x in packed:
            pw.matmul(lib, x)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times[1:])
    return {"packed_bytes": nbytes, "seconds": sec, "gb_per_s": nbytes / sec / 1e9}


def copy_bandwidth(rounds: int) -> float:
    src = torch.ones(64 << 20)  # 256 MB
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / statistics.median(times[1:]) / 1e9


def bench_model(path: str, args, work: str) -> dict:
    name = os.path.basename(os.path.normpath(path))
    models = {}
    dense32, tok = load_model(path, dtype="fp32")
    models["dense fp32"] = dense32
    models["dense bf16"] = load_model(path, dtype="bf16", tokenizer=False)[0]
    for cfg, recipe in configs().items():
        out = os.path.join(work, f"{name}-{cfg}")
        encode(path, out, recipe)
        models[cfg] = load_model(out, dtype="fp32", tokenizer=False)[0]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    vocab = dense32.config.vocab_size
    runs = [(n, on) for n in models for on in ((True, False) if n.startswith("dense") is False else (True,))]
    dec = {r: [] for r in runs}
    pre = {r: [] for r in runs}
    for n, on in runs:  # warm-up (and the kernel's one-time build)
        with kernel_switch(on):
            decode_seconds(models[n], ids, 2)
            prefill_seconds(models[n], args.prefill, vocab)
    for _ in range(args.rounds):
        for n, on in runs:
            with kernel_switch(on):
                dec[(n, on)].append(args.tokens / decode_seconds(models[n], ids, args.tokens))
                pre[(n, on)].append(prefill_seconds(models[n], args.prefill, vocab))
    base_tps = statistics.median(dec[("dense fp32", True)])
    base_pre = statistics.median(pre[("dense fp32", True)])
    rows = []
    for n, on in runs:
        tps, p = statistics.median(dec[(n, on)]), statistics.median(pre[(n, on)])
        rows.append({"model": n, "kernel": on if not n.startswith("dense") else None, "tokens_per_s": round(tps, 2),
                     "decode_vs_dense_fp32": round(tps / base_tps, 3), "prefill_ms": round(p * 1e3, 2),
                     "prefill_vs_dense_fp32": round(p / base_pre, 3)})
    lib = matvec.kernel()
    bw = {}
    if lib is not None:
        for cfg in ("nf4", "int8", "3bit"):
            bw[cfg] = kernel_bandwidth(models[cfg], lib, args.rounds)
    return {"model": path, "rows": rows, "kernel_bandwidth": bw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="dense model folder (repeatable)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.model or [os.path.join(ROOT, "kbitcli", "assets", "stories260K")]
    result = {"threads": torch.get_num_threads(), "kernel": matvec.kernel() is not None,
              "load_before": os.getloadavg()[0], "models": []}
    with tempfile.TemporaryDirectory(prefix="kbit-decode-speed-") as work:
        result["copy_gb_per_s"] = copy_bandwidth(args.rounds)
        for p in paths:
            result["models"].append(bench_model(p, args, work))
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"threads {result['threads']}, load average {result['load_before']:.2f} -> {result['load_after']:.2f}, "
          f"torch copy {result['copy_gb_per_s']:.1f} GB/s (bytes read)")
    for m in result["models"]:
        print(f"\n{m['model']}: greedy decode of {args.tokens} tokens, prefill of {args.prefill} tokens")
        print(f"{'model':<12}{'kernel':>8}{'tokens/s':>10}{'vs fp32':>9}{'prefill ms':>12}{'vs fp32':>9}")
        for r in m["rows"]:
            k = "-" if r["kernel"] is None else ("on" if r["kernel"] else "off")
            print(f"{r['model']:<12}{k:>8}{r['tokens_per_s']:>10.2f}{r['decode_vs_dense_fp32']:>8.2f}x"
                  f"{r['prefill_ms']:>12.2f}{r['prefill_vs_dense_fp32']:>8.2f}x")
        for cfg, b in m["kernel_bandwidth"].items():
            print(f"kernel bandwidth {cfg}: {b['packed_bytes'] / 1e6:.1f} MB packed in {b['seconds'] * 1e3:.2f} ms = "
                  f"{b['gb_per_s']:.2f} GB/s ({b['gb_per_s'] / result['copy_gb_per_s']:.2f}x copy)")


if __name__ == "__main__":
    main()
