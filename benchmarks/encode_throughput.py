"""Encode / decode throughput and peak memory on a >= 1 GB checkpoint, against plain safetensors, in one run.

    .venv/bin/python benchmarks/encode_throughput.py [--json] [--cache DIR] [--threads N]

The checkpoint is a Llama architecture (transformers LlamaConfig; 20 layers, hidden 1024, FFN 2816, vocab
32000: 289M parameters, 1.16 GB in fp32) with transformers' random initialisation, saved with
save_pretrained(safe_serialization=True) in 500 MB shards. It is built once and cached outside the repo
(default: $TMPDIR/kbit-bench). Random weights are fine for a throughput and memory benchmark — the shapes
and byte counts are those of a real model — but say nothing about quality (see `kbit bench error`).

Every measurement runs in its own child process, so each one's peak RSS (getrusage ru_maxrss, which includes
the pages of the memory-mapped input it touched) is its own:
  baseline  safetensors: safe_open(...).get_tensor(n) for every tensor + save_file(...) per shard + fsync
            (kbit fsyncs what it writes too), the least a converter must do with the same files;
  encode    kbitcli.encode.encode(...) with several recipes (progress off; sha256 of inputs and outputs for
            the manifest included, as `kbit encode` does it);
  decode    kbitcli.decode.decode(...) of the nf4 output back to fp32 safetensors.
MB/s is always MB of the fp32 checkpoint per second of wall time (decode: of the dense fp32 it writes).
A second, 0.31 GB model (same layer shapes, 1 layer) is encoded too: peak RSS must not grow with model size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

GB = 1e9
LAYERS = {"1.16 GB": 20, "0.31 GB": 1}
ENCODES = [  # (label, recipe keyword arguments)
    ("kbit encode nf4 b64 (scale search 4, default)", dict(bits=4, block_size=64, dtype="nf")),
    ("kbit encode nf4 b64, plain absmax", dict(bits=4, block_size=64, dtype="nf", scale_search=1)),
    ("kbit encode nf4 b64 + double quant", dict(bits=4, block_size=64, dtype="nf", double_quant=True)),
    ("kbit encode int8 b64", dict(bits=8, block_size=64, dtype="int", scale_search=1)),
]


# ----------------------------------------------------------------------------------------------- child side

def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    exec(), so a child would report its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kilobytes too


def child(job: dict) -> dict:
    """Runs in a fresh process: one measurement, returned as a dict (printed as the last line of stdout)."""
    import torch

    torch.set_num_threads(job["threads"])
    started_rss = _peak_rss_mb()  # the interpreter + torch (+ kbit) before any work
    t0 = time.perf_counter()
    if job["op"] == "baseline":
        from safetensors import safe_open
        from safetensors.torch import save_file

        os.makedirs(job["dst"])
        for f in sorted(os.listdir(job["src"])):
            if not f.endswith(".safetensors"):
                continue
            with safe_open(os.path.join(job["src"], f), framework="pt") as fh:
                tensors = {n: fh.get_tensor(n) for n in fh.keys()}
                metadata = fh.metadata()
            out = os.path.join(job["dst"], f)
            save_file(tensors, out, metadata=metadata)
            del tensors
            with open(out, "rb+") as fh:
                os.fsync(fh.fileno())
    elif job["op"] == "encode":
        from kbitcli.encode import encode
        from kbitcli.recipes import Recipe

        encode(job["src"], job["dst"], Recipe(**job["recipe"]), force=True)
    elif job["op"] == "decode":
        from kbitcli.decode import decode

        decode(job["src"], job["dst"], "fp32", force=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "startup_rss_mb": started_rss}


# ---------------------------------------------------------------------------------------------- parent side

def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def build_model(path: str, layers: int, say) -> None:
    """A Llama checkpoint with random weights, saved as transformers saves any model (cached)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    say(f"building a {layers}-layer random-init Llama checkpoint in {path} (once; cached)")
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="500MB")
    os.replace(tmp, path)


def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job['op']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(job["dst"], ignore_errors=True) if not job.get("keep") else None
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kbit-bench"),
                    help="where the checkpoints are built once and outputs are written (not in the repo)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every child (default: all cores)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    say = (lambda m: None) if args.json else (lambda m: err.print(f"[dim]{m}[/dim]"))
    os.makedirs(args.cache, exist_ok=True)
    models = {}
    for label, layers in LAYERS.items():
        models[label] = os.path.join(args.cache, f"llama-random-{layers}L-fp32")
        build_model(models[label], layers, say)
    big, small = models["1.16 GB"], models["0.31 GB"]
    size = {label: folder_bytes(path) for label, path in models.items()}
    out = os.path.join(args.cache, "out")
    shutil.rmtree(out, ignore_errors=True)

    rows = []

    def measure(name: str, model: str, job: dict, bytes_moved: int) -> dict:
        say(f"{name} on the {model} model ...")
        r = run_child({**job, "threads": args.threads})
        row = {"run": name, "model": model, "mb": bytes_moved / 1e6, "seconds": r["seconds"],
               "mb_per_s": bytes_moved / 1e6 / r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
               "startup_rss_mb": r["startup_rss_mb"], "rss_over_file": r["peak_rss_mb"] * 2**20 / size[model]}
        rows.append(row)
        return row

    base = measure("baseline: safetensors load + save", "1.16 GB", {"op": "baseline", "src": big, "dst": out}, size["1.16 GB"])
    for name, recipe in ENCODES:
        keep = recipe == ENCODES[0][1]
        measure(name, "1.16 GB", {"op": "encode", "src": big, "dst": out + "-nf4" if keep else out, "recipe": recipe,
                                  "keep": keep}, size["1.16 GB"])
    measure("kbit decode nf4 -> fp32", "1.16 GB", {"op": "decode", "src": out + "-nf4", "dst": out}, size["1.16 GB"])
    shutil.rmtree(out + "-nf4", ignore_errors=True)
    measure(ENCODES[0][0], "0.31 GB", {"op": "encode", "src": small, "dst": out, "recipe": ENCODES[0][1]}, size["0.31 GB"])
    for row in rows:
        row["speed_vs_baseline"] = row["mb_per_s"] / base["mb_per_s"]

    big_rss = rows[1]["peak_rss_mb"]
    small_rss = rows[-1]["peak_rss_mb"]
    summary = {"model": "Llama architecture, random init (transformers LlamaConfig), fp32 safetensors shards of 500 MB",
               "bytes": size, "threads": args.threads, "cpus": os.cpu_count(), "runs": rows,
               "peak_rss_growth_0.31GB_to_1.16GB_mb": big_rss - small_rss}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0

    console = Console()
    table = Table(title=f"kbit encode / decode throughput — random-init Llama, {size['1.16 GB'] / GB:.2f} GB fp32 "
                        f"({args.threads} torch threads, {os.cpu_count()} CPUs)")
    for col in ("run", "model", "seconds", "MB/s", "vs baseline", "peak RSS MB", "RSS / file size"):
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    for r in rows:
        table.add_row(r["run"], r["model"], f"{r['seconds']:.2f}", f"{r['mb_per_s']:.0f}", f"{r['speed_vs_baseline']:.2f}x",
                      f"{r['peak_rss_mb']:.0f}", f"{r['rss_over_file']:.2f}")
    console.print(table)
    console.print(f"Peak RSS of `{ENCODES[0][0]}`: {small_rss:.0f} MB on the 0.31 GB model, {big_rss:.0f} MB on the "
                  f"1.16 GB one ({big_rss - small_rss:+.0f} MB for 3.7x the weights). Processes start at "
                  f"~{rows[1]['startup_rss_mb']:.0f} MB (Python + torch). Weights are random: a throughput and memory "
                  "benchmark, not a quality one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
