"""Peak memory and tokens/s of LoRA finetuning on a frozen k-bit base vs the same LoRA on the dense base.

Both runs use the same loop (kbitcli.finetune.train), the same LoRA (rank, alpha, targets = the layers the
k-bit checkpoint quantized), the same batches and the same number of steps; the only difference is the
base: KbitLinear modules holding packed codes vs nn.Linear holding full-precision weights. Each run is a
fresh subprocess, so its peak RSS (getrusage ru_maxrss) is that run's alone; "idle" is the RSS of the same
process after importing torch + transformers and before loading anything, so peak - idle is what the model
and the training cost.

    .venv/bin/python benchmarks/finetune_memory.py                       # stories260K (real, 260K params)
    .venv/bin/python benchmarks/finetune_memory.py --synthetic 8,1024    # a random-init Llama, 8 layers x 1024
    .venv/bin/python benchmarks/finetune_memory.py --json

Allocator: with glibc's default (a dynamic mmap threshold that rises to 32 MB), the transient tensors of
training (dequantized slabs, activations) are freed into malloc arenas that keep them, and peak RSS ends up
a few hundred MB above what is live, for both runs alike. The workers therefore run with
MALLOC_MMAP_THRESHOLD_=65536 (large blocks go back to the OS on free), so peak RSS tracks live memory;
`--mmap-threshold 0` measures glibc's default instead.

The synthetic model (random weights, built from a Llama config with stories260K's tokenizer) exists only to
show how memory scales with the base's size; its losses mean nothing. Ratios are kbit / dense.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def worker(args) -> None:
    import resource

    import psutil
    import torch

    import transformers  # noqa: F401  (counted in idle: both runs import it)

    idle = psutil.Process().memory_info().rss
    from kbitcli.finetune import TrainConfig, train
    from kbitcli.finetune.data import load_blocks
    from kbitcli.finetune.lora import attach_lora
    from kbitcli.models.load import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype="fp32")
    loaded = psutil.Process().memory_info().rss
    names = json.loads(args.targets)
    cfg = TrainConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0, lr=1e-4, steps=args.steps,
                      batch_size=args.batch_size, context=args.context, warmup=0, eval_every=0, save_every=0)
    blocks = load_blocks(args.text, tok, cfg.context)
    loras = attach_lora(model, names, cfg.rank, cfg.alpha, cfg.dropout, seed=0)
    opt = train.make_optimizer(loras, cfg)
    tokens = seconds = 0.0
    losses = []
    for rec in train.steps(model, loras, opt, blocks, cfg):
        if rec["step"] > 1:  # step 1 pays one-time allocation costs; time the steady state
            tokens += rec["tokens"]
            seconds += rec["seconds"]
        losses.append(rec["loss"])
    print(json.dumps({"idle_rss_mb": idle / 2**20, "loaded_rss_mb": loaded / 2**20,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tokens_per_s": tokens / seconds if seconds else None, "loss_first": losses[0],
                      "loss_last": losses[-1], "targets": len(names),
                      "params": sum(p.numel() for p in model.parameters())}))


def run_worker(model: str, targets: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--targets", json.dumps(targets),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--context", str(args.context),
           "--rank", str(args.rank), "--text", args.text]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"worker failed on {model}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def synthetic_llama(spec: str, folder: str, tokenizer_from: str) -> str:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden = (int(x) for x in spec.split(","))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=512,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    dst = os.path.join(folder, f"synthetic-llama-{layers}x{hidden}")
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(os.path.join(tokenizer_from, f), dst)
    return dst


def compare(dense: str, args, tmp: str) -> dict:
    from kbitcli.encode import encode
    from kbitcli.recipes import Recipe

    kbit = os.path.join(tmp, os.path.basename(dense) + "-nf4")
    res = encode(dense, kbit, Recipe(bits=4, block_size=64, dtype="nf"))
    targets = [t["name"][: -len(".weight")] for t in res["plan"] if t["quantized"]]
    out = {"model": os.path.basename(dense), "params": res["params"], "quantized_params": res["quantized_params"],
           "steps": args.steps, "batch_size": args.batch_size, "context": args.context, "rank": args.rank,
           "repeats": args.repeats,
           "malloc_mmap_threshold": args.mmap_threshold or "glibc default"}
    runs = {"dense": [], "kbit": []}
    for _ in range(args.repeats):  # alternate, so a busy moment on a shared machine hits both sides alike
        runs["dense"].append(run_worker(dense, targets, args))
        runs["kbit"].append(run_worker(kbit, targets, args))
    for side, rs in runs.items():  # the median run by speed; memory is the smallest peak seen
        rs.sort(key=lambda r: r["tokens_per_s"])
        out[side] = {**rs[len(rs) // 2], "peak_rss_mb": min(r["peak_rss_mb"] for r in rs),
                     "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in rs]}
    d, k = out["dense"], out["kbit"]
    out["ratio_peak_rss"] = k["peak_rss_mb"] / d["peak_rss_mb"]
    out["ratio_peak_minus_idle"] = (k["peak_rss_mb"] - k["idle_rss_mb"]) / (d["peak_rss_mb"] - d["idle_rss_mb"])
    out["ratio_tokens_per_s"] = k["tokens_per_s"] / d["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="dense causal-LM folders (default: bundled stories260K, unless --synthetic)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--targets", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side (alternating); median tokens/s")
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="MALLOC_MMAP_THRESHOLD_ for both workers (0: glibc's default, see the docstring)")
    ap.add_argument("--text", default=None, help="training text (default: the bundled TinyStories text)")
    ap.add_argument("--synthetic", action="append", default=[], metavar="LAYERS,HIDDEN",
                    help="also a random-init Llama of this size (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from kbitcli.paths import STORIES260K, TINYSTORIES_TEXT

    args.text = args.text or TINYSTORIES_TEXT
    if args.worker:
        return worker(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="kbit-ftbench-") as tmp:
        models = list(args.models) or ([] if args.synthetic else [STORIES260K])
        models += [synthetic_llama(s, tmp, STORIES260K) for s in args.synthetic]
        for m in models:
            results.append(compare(m, args, tmp))
            r = results[-1]
            if not args.json:
                d, k = r["dense"], r["kbit"]
                print(f"{r['model']} ({r['params']:,} params, {r['quantized_params']:,} in k bits), LoRA r={r['rank']}, "
                      f"{r['steps']} steps x {r['batch_size']} x {r['context']} tokens")
                for name, x in (("dense LoRA", d), ("kbit nf4 LoRA", k)):
                    print(f"  {name:14s} peak RSS {x['peak_rss_mb']:8.1f} MB (idle {x['idle_rss_mb']:.1f}, "
                          f"peak-idle {x['peak_rss_mb'] - x['idle_rss_mb']:8.1f})  {x['tokens_per_s']:9.1f} tok/s  "
                          f"loss {x['loss_first']:.3f} -> {x['loss_last']:.3f}")
                print(f"  kbit/dense: peak RSS x{r['ratio_peak_rss']:.3f}, peak-idle x{r['ratio_peak_minus_idle']:.3f}, "
                      f"tokens/s x{r['ratio_tokens_per_s']:.3f}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
