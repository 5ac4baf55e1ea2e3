"""What a k-bit embedding (KbitEmbedding + a tied lm_head over the same codes) costs and saves, in one run.

    .venv/bin/python benchmarks/kbit_embedding.py [--model /work/smollm2-dense] [--model kbitcli/assets/stories260K]
        [--max-tokens 4096] [--lookup-model /work/smollm2-dense] [--rss-model /work/smollm2-dense] [--json]

For each dense model: nf4 (recipes/llama-nf4.yaml), nf4+emb (the same recipe with the input embedding targeted
too, so a tied lm_head is k-bit as well) and nf4+emb8 (the embedding at 8 bits, int) are compared by
  - quality: `kbit bench ppl` (bench_ppl) on kbitcli/assets/text/tinystories_v2_valid_first48k.txt, --max-tokens
    scored tokens: nll of the k-bit model vs the dense one, KL and top-1 agreement, for both configs;
For --rss-model: peak RSS of a fresh `kbit generate` process (16 greedy tokens) for dense and each config
(ru_maxrss of the child, so it includes Python, torch and transformers themselves: compare the differences).
For --lookup-model: KbitEmbedding lookup of 4,096 random ids vs nn.Embedding over the dense table (the same
decoded values), median of 21 runs each, interleaved, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kbitcli.bench.ppl import bench_ppl  # noqa: E402
from kbitcli.encode import encode  # noqa: E402
from kbitcli.models.load import load_model  # noqa: E402
from kbitcli.recipes import Override, load_recipe  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TEXT = os.path.join(ROOT, "kbitcli", "assets", "text", "tinystories_v2_valid_first48k.txt")
KBIT = os.path.join(os.path.dirname(sys.executable), "kbit")


def recipes() -> dict:
    nf4 = load_recipe(os.path.join(ROOT, "recipes", "llama-nf4.yaml"))
    return {"nf4": nf4, "nf4+emb": replace(nf4, targets=list(nf4.targets) + ["model.embed_tokens"]),
            "nf4+emb8": replace(nf4, overrides=[Override("model.embed_tokens", {"bits": 8, "dtype": "int"})])}


def quality(path: str, max_tokens: int) -> dict:
    out = {}
    for name, recipe in recipes().items():
        r = bench_ppl(path, TEXT, recipe, max_tokens=max_tokens)
        q = r["quantized"]
        out[name] = {"nll_dense": r["baseline"]["nll"], "nll": q["nll"], "delta_nll": q["nll"] - r["baseline"]["nll"],
                     "kl": q["kl_divergence"], "top1": q["top1_agreement"], "tokens": r["tokens"],
                     "bits_per_param_model": q.get("bits_per_param_model")}
    return out


def peak_rss(model: str) -> float:
    """MB: peak resident set of one `kbit generate` process (a fresh one, so the maximum is its own)."""
    code = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "assert r.returncode == 0, r.stderr\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    cmd = [sys.executable, "-c", code, KBIT, "generate", model, "-n", "16", "--threads", "1", "--quiet", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def lookup_times(kbit_path: str, n_ids: int = 4096, runs: int = 21) -> dict:
    torch.set_num_threads(1)
    model = load_model(kbit_path, dtype="fp32", tokenizer=False)[0]
    kemb = model.model.embed_tokens
    dense = torch.nn.Embedding.from_pretrained(kemb.dequantize_table())
    ids = torch.randint(0, kemb.num_embeddings, (1, n_ids), generator=torch.Generator().manual_seed(0))
    assert torch.equal(kemb(ids), dense(ids))
    times = {"KbitEmbedding": [], "nn.Embedding": []}
    with torch.inference_mode():
        for _ in range(runs):
            for name, m in (("KbitEmbedding", kemb), ("nn.Embedding", dense)):
                t0 = time.perf_counter()
                m(ids)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ids": n_ids, "table": list(kemb.shape), "kbit_ms": med["KbitEmbedding"] * 1e3,
            "dense_ms": med["nn.Embedding"] * 1e3, "ratio": med["KbitEmbedding"] / med["nn.Embedding"],
            "kbit_table_mb": kemb.memory_bytes() / 1e6, "dense_table_mb": dense.weight.numel() * 4 / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="dense model folder for the quality comparison (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--rss-model", default=None)
    ap.add_argument("--lookup-model", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = {"load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="kbit-embedding-") as work:
        if args.lookup_model or args.rss_model:
            for path in {args.lookup_model, args.rss_model} - {None}:
                for name, recipe in recipes().items():
                    encode(path, os.path.join(work, f"{os.path.basename(os.path.normpath(path))}-{name}"), recipe)
        if args.lookup_model:
            result["lookup"] = lookup_times(os.path.join(work, f"{os.path.basename(os.path.normpath(args.lookup_model))}-nf4+emb"))
        if args.rss_model:
            base = os.path.join(work, os.path.basename(os.path.normpath(args.rss_model)))
            rss = {}
            for _ in range(2):  # round-robin, keep the smaller (the page cache and load vary a little)
                for name, path in [("dense", args.rss_model)] + [(n, f"{base}-{n}") for n in recipes()]:
                    rss[name] = min(rss.get(name, float("inf")), peak_rss(path))
            result["peak_rss_mb"] = rss
        result["quality"] = {p: quality(p, args.max_tokens) for p in args.model or []}
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    print(f"load average {result['load_before']:.2f} -> {result['load_after']:.2f}")
    if "lookup" in result:
        lk = result["lookup"]
        print(f"lookup of {lk['ids']} ids in a {lk['table']} table: KbitEmbedding {lk['kbit_ms']:.2f} ms, nn.Embedding "
              f"{lk['dense_ms']:.2f} ms ({lk['ratio']:.1f}x); table {lk['kbit_table_mb']:.1f} MB vs {lk['dense_table_mb']:.1f} MB")
    if "peak_rss_mb" in result:
        r = result["peak_rss_mb"]
        print("peak RSS of `kbit generate` (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()))
    for p, q in result["quality"].items():
        for name, v in q.items():
            print(f"{p} {name}: nll dense {v['nll_dense']:.4f}, k-bit {v['nll']:.4f} (delta {v['delta_nll']:+.4f}), "
                  f"KL {v['kl']:.4f}, top-1 {v['top1']:.3f}, {v['tokens']} tokens, "
                  f"{v['bits_per_param_model']} bits/param (model)")


if __name__ == "__main__":
    main()
