"""Batch-1 decode tokens/s of k-bit models vs dense fp32 and bf16, fused kernel on and off, in one run.

    .venv/bin/python benchmarks/decode_speed.py --model /work/smollm2-dense [--model kbitcli/assets/stories260K]
        [--tokens 32] [--rounds 3] [--threads N[,M...]] [--prefill 128] [--embed] [--configs nf4,nf4+emb]
        [--no-kernel-off] [--exact-too] [--json]

For each dense model folder: encodes nf4 (recipes/llama-nf4.yaml), int4 (k=4 int B=64), int8 (recipes/int8.yaml)
and 3-bit (k=3 nf B=64 + double quant) into a temporary folder (--embed adds "nf4+emb": nf4 with the input
embedding targeted too, so it loads as a KbitEmbedding and a tied lm_head as a KbitLinear over the same codes;
"nf4+emb8": the same with the embedding at 8 bits, int);
--configs keeps only the named k-bit configs, e.g. nf4,nf4+emb), loads them all plus the dense model at fp32 and bf16 into this
process, then times, round-robin (over models and, with --threads 2,1, over thread counts) so load on the
machine hits all alike:
  - decode: greedy generation of --tokens new tokens after a short prompt (`kbit generate`'s loop: prefill of
    the prompt included), tokens/s; every k-bit model twice, with the fused kernel (after) and with
    KBIT_KERNEL=0 (before: dequantize by slabs + matmul; --no-kernel-off skips these); --exact-too adds a third
    time, the kernel with its integer path off (KBIT_EXACT=1: the exact fp32 walk, "exact");
  - prefill: one forward of --prefill tokens, ms, kernel on and off (--prefill 0 skips it);
  - kernel bandwidth: every KbitLinear of the nf4 / int8 model once at batch 1, bytes of packed codes +
    scales read per second, against torch's copy of a 256 MB tensor (bytes read per second) in the same run.
Medians over --rounds, and the best round ("best": on a shared machine the fastest of several interleaved rounds
is the least disturbed one; a 1 MB model's median moves by 10-20% from run to run). Ratios are against dense
fp32 of the same round set and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kbitcli.core import matvec  # noqa: E402
from kbitcli.encode import encode  # noqa: E402
from kbitcli.models.load import kbit_modules, load_model  # noqa: E402
from kbitcli.recipes import Override, Recipe, load_recipe  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPT = "The capital of France is"


EMBED = "re:.*(embed_tokens|wte|word_embeddings)"  # the input embedding of Llama / GPT-2 / BERT-style models


def configs(embed: bool = False) -> dict[str, Recipe]:
    nf4 = load_recipe(os.path.join(ROOT, "recipes", "llama-nf4.yaml"))
    out = {"nf4": nf4,
           "int4": Recipe(bits=4, block_size=64, dtype="int"),
           "int8": load_recipe(os.path.join(ROOT, "recipes", "int8.yaml")),
           "3bit": Recipe(bits=3, block_size=64, dtype="nf", double_quant=True)}
    if embed:
        out["nf4+emb"] = replace(nf4, targets=list(nf4.targets) + [EMBED])
        out["nf4+emb8"] = replace(nf4, overrides=[Override(EMBED, {"bits": 8, "dtype": "int"})])
    return out


class kernel_switch:
    """Inside the block: the fused kernel off when `on` is False (what KBIT_KERNEL=0 does for a whole process);
    on "exact", the kernel with its integer path off (KBIT_EXACT=1)."""

    def __init__(self, on: bool | str):
        self.on = on

    def __enter__(self):
        self.old = matvec.set_enabled(bool(self.on)), matvec.set_exact(self.on == "exact")

    def __exit__(self, *exc):
        matvec.set_enabled(self.old[0])
        matvec.set_exact(self.old[1])


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
    for cfg, recipe in configs(args.embed).items():
        if args.configs and cfg not in args.configs:
            continue
        out = os.path.join(work, f"{name}-{cfg}")
        encode(path, out, recipe)
        models[cfg] = load_model(out, dtype="fp32", tokenizer=False)[0]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    vocab = dense32.config.vocab_size
    offs = (True,) + (("exact",) if args.exact_too else ()) + (() if args.no_kernel_off else (False,))
    runs = [(n, on) for n in models for on in ((True,) if n.startswith("dense") else offs)]
    keys = [(t, n, on) for t in args.threads for n, on in runs]
    dec = {r: [] for r in keys}
    pre = {r: [] for r in keys}
    for t, n, on in keys:  # warm-up (and the kernel's one-time build)
        torch.set_num_threads(t)
        with kernel_switch(on):
            decode_seconds(models[n], ids, 2)
            if args.prefill:
                prefill_seconds(models[n], args.prefill, vocab)
    for _ in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)  # the kernel's threads follow torch's (KbitLinear passes get_num_threads)
            for n, on in runs:
                with kernel_switch(on):
                    dec[(t, n, on)].append(args.tokens / decode_seconds(models[n], ids, args.tokens))
                    if args.prefill:
                        pre[(t, n, on)].append(prefill_seconds(models[n], args.prefill, vocab))
    rows = []
    for t, n, on in keys:
        base_tps = statistics.median(dec[(t, "dense fp32", True)])
        tps = statistics.median(dec[(t, n, on)])
        best, base_best = max(dec[(t, n, on)]), max(dec[(t, "dense fp32", True)])
        row = {"threads": t, "model": n, "kernel": on if not n.startswith("dense") else None,
               "tokens_per_s": round(tps, 2), "decode_vs_dense_fp32": round(tps / base_tps, 3),
               "best_tokens_per_s": round(best, 2), "best_vs_dense_fp32": round(best / base_best, 3)}
        if args.prefill:
            p, base_pre = statistics.median(pre[(t, n, on)]), statistics.median(pre[(t, "dense fp32", True)])
            row.update(prefill_ms=round(p * 1e3, 2), prefill_vs_dense_fp32=round(p / base_pre, 3))
        rows.append(row)
    lib = matvec.kernel()
    bw = {}
    if lib is not None:
        torch.set_num_threads(args.threads[0])
        for cfg in ("nf4", "int8", "3bit", "nf4+emb", "nf4+emb8"):
            if cfg in models:
                bw[cfg] = kernel_bandwidth(models[cfg], lib, args.rounds)
    return {"model": path, "rows": rows, "kernel_bandwidth": bw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="dense model folder (repeatable)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128, help="prefill tokens (0: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default=None, help="thread count(s), comma-separated, e.g. 2,1 (default: torch's)")
    ap.add_argument("--embed", action="store_true", help='add "nf4+emb": nf4 with the input embedding (and a tied '
                    "lm_head) at k bits")
    ap.add_argument("--configs", default=None, help="only these k-bit configs, comma-separated (e.g. nf4,nf4+emb)")
    ap.add_argument("--no-kernel-off", action="store_true", help="skip the KBIT_KERNEL=0 (before) runs")
    ap.add_argument("--exact-too", action="store_true", help='also time every k-bit model with the kernel\'s integer '
                    'path off (KBIT_EXACT=1: kernel "exact")')
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    args.configs = set(args.configs.split(",")) if args.configs else None
    paths = args.model or [os.path.join(ROOT, "kbitcli", "assets", "stories260K")]
    result = {"threads": args.threads, "kernel": matvec.kernel() is not None,
              "load_before": os.getloadavg()[0], "models": []}
    with tempfile.TemporaryDirectory(prefix="kbit-decode-speed-") as work:
        torch.set_num_threads(args.threads[0])
        result["copy_gb_per_s"] = copy_bandwidth(args.rounds)
        for p in paths:
            result["models"].append(bench_model(p, args, work))
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"threads {result['threads']}, load average {result['load_before']:.2f} -> {result['load_after']:.2f}, "
          f"torch copy {result['copy_gb_per_s']:.1f} GB/s (bytes read, {args.threads[0]} thread(s))")
    for m in result["models"]:
        print(f"\n{m['model']}: greedy decode of {args.tokens} tokens, prefill of {args.prefill} tokens")
        print(f"{'threads':>7} {'model':<12}{'kernel':>8}{'tokens/s':>10}{'vs fp32':>9}{'best':>9}{'vs fp32':>9}"
              f"{'prefill ms':>12}{'vs fp32':>9}")
        for r in m["rows"]:
            k = "-" if r["kernel"] is None else (r["kernel"] if isinstance(r["kernel"], str) else ("on" if r["kernel"] else "off"))
            pre = f"{r['prefill_ms']:>12.2f}{r['prefill_vs_dense_fp32']:>8.2f}x" if "prefill_ms" in r else ""
            print(f"{r['threads']:>7} {r['model']:<12}{k:>8}{r['tokens_per_s']:>10.2f}{r['decode_vs_dense_fp32']:>8.2f}x"
                  f"{r['best_tokens_per_s']:>9.2f}{r['best_vs_dense_fp32']:>8.2f}x" + pre)
        for cfg, b in m["kernel_bandwidth"].items():
            print(f"kernel bandwidth {cfg}: {b['packed_bytes'] / 1e6:.1f} MB packed in {b['seconds'] * 1e3:.2f} ms = "
                  f"{b['gb_per_s']:.2f} GB/s ({b['gb_per_s'] / result['copy_gb_per_s']:.2f}x copy)")


if __name__ == "__main__":
    main()
