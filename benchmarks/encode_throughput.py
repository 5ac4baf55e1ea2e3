"""Encode / decode throughput and peak memory on a >= 1 GB checkpoint, against plain safetensors, in one run.

    .venv/bin/python benchmarks/encode_throughput.py [--json] [--cache DIR]      (`make bench`)

The checkpoint is a Llama architecture (transformers LlamaConfig: 20 layers, hidden 1024, FFN 2816, 16 heads,
4 KV heads, vocab 32000, untied lm_head: 289M parameters, 1.16 GB in fp32) with transformers' own random
initialisation, saved with save_pretrained(safe_serialization=True) in 500 MB shards. It is built once and
cached outside the repo (default $TMPDIR/kbit-bench). Random weights are fine for a throughput and memory
benchmark — the tensor shapes and byte counts are those of a real model — but say nothing about quality
(`kbit bench error` measures that on real weights).

Every measurement runs in a child process of its own, so its peak RSS (VmHWM: it includes the pages of the
memory-mapped input that the process touched) is its own:
  baseline   safe_open(...).get_tensor(n) for every tensor + save_file(...) per shard + fsync (kbit fsyncs what
             it writes too): the least any converter does with the same files;
  encode     kbitcli.encode.encode(src, dst, Recipe(...)) — the whole `kbit encode` path, sha256 of input and
             output for the manifest included;
  decode     kbitcli.decode.decode(nf4 output, dst, "fp32") back to dense safetensors.
MB/s is MB of the fp32 checkpoint per second of wall time (for decode: of the fp32 it writes). The same
encode and decode also run on a 1-layer model of the same widths (0.31 GB): peak RSS must not grow with the
model (and on a 40-layer one, 2.07 GB). Timings on a machine shared with other work are lower bounds; the load
average is printed with them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

BIG, SMALL, LARGER = "1.16 GB", "0.31 GB", "2.07 GB"
LAYERS = {SMALL: 1, BIG: 20, LARGER: 40}  # same layer shapes: only the number of layers differs
NF4 = dict(bits=4, block_size=64, dtype="nf")  # scale_search: the data-free default (1: plain absmax)
ENCODES = [  # (label, Recipe keyword arguments)
    ("encode nf4 b64 (data-free default)", NF4),
    ("encode nf4 b64, scale_search 4", {**NF4, "scale_search": 4}),
    ("encode nf4 b64 + double quant", {**NF4, "double_quant": True}),
    ("encode int8 b64", dict(bits=8, block_size=64, dtype="int", scale_search=1)),
]
DECODE = "decode nf4 b64 -> fp32"


# ----------------------------------------------------------------------------------------------- child side

def peak_rss_mb() -> float:
    """This process's peak resident set. Not getrusage's ru_maxrss: Linux carries that across exec(), so a
    child would report its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def build_model(path: str, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="500MB")
    os.replace(tmp, path)


def safetensors_copy(src: str, dst: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst)
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(src, f), framework="pt") as fh:
                tensors = {n: fh.get_tensor(n) for n in fh.keys()}
                metadata = fh.metadata()
            save_file(tensors, os.path.join(dst, f), metadata=metadata)
            del tensors
            with open(os.path.join(dst, f), "rb+") as out:
                os.fsync(out.fileno())


def child(job: dict) -> dict:
    """One measurement in a fresh process; the parent reads the dict from the last line of stdout."""
    if job["op"] == "build":
        build_model(job["dst"], job["layers"])
        return {}
    # everything is imported before the clock starts (a CLI has it loaded by then too)
    if job["op"] == "baseline":
        importlib.import_module("safetensors.torch")  # (safetensors_copy's own import is then instant)
    elif job["op"] == "encode":
        from kbitcli.encode import encode
        from kbitcli.recipes import Recipe
    elif job["op"] == "decode":
        from kbitcli.decode import decode
    startup = peak_rss_mb()
    t0 = time.perf_counter()
    if job["op"] == "baseline":
        safetensors_copy(job["src"], job["dst"])
    elif job["op"] == "encode":
        encode(job["src"], job["dst"], Recipe(**job["recipe"]))
    elif job["op"] == "decode":
        decode(job["src"], job["dst"], "fp32")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "startup_rss_mb": startup}


# ---------------------------------------------------------------------------------------------- parent side

def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step {job['op']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def safetensors_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def run(cache: str, say) -> dict:
    os.makedirs(cache, exist_ok=True)
    models = {}
    for label, layers in LAYERS.items():
        models[label] = os.path.join(cache, f"llama-random-{layers}L-fp32")
        if not os.path.exists(os.path.join(models[label], "config.json")):
            say(f"building the {label} random-init Llama checkpoint in {models[label]} (once; it is cached)")
            run_child({"op": "build", "dst": models[label], "layers": layers})
    size = {label: safetensors_bytes(path) for label, path in models.items()}
    out, kept = os.path.join(cache, "out"), os.path.join(cache, "out-nf4")
    for leftover in (out, kept):
        shutil.rmtree(leftover, ignore_errors=True)
    rows = []
    load_before = os.getloadavg()[0]

    def measure(run_name: str, model: str, job: dict, keep: bool = False) -> None:
        say(f"{run_name} ({model}) ...")
        dst = kept if keep else out
        r = run_child({**job, "dst": dst})
        written = safetensors_bytes(dst)
        if not keep:
            shutil.rmtree(dst, ignore_errors=True)
        moved = size[model]  # the fp32 checkpoint read (encode, baseline) or written (decode)
        rows.append({"run": run_name, "model": model, "seconds": round(r["seconds"], 3),
                     "mb_per_s": round(moved / 1e6 / r["seconds"], 1), "output_gb": round(written / 1e9, 3),
                     "peak_rss_mb": round(r["peak_rss_mb"]), "startup_rss_mb": round(r["startup_rss_mb"]),
                     "peak_rss_over_file_size": round(r["peak_rss_mb"] * 2**20 / size[model], 3)})

    for model in (BIG, SMALL, LARGER):
        if model == BIG:
            measure("baseline: safetensors load + save", model, {"op": "baseline", "src": models[model]})
        for i, (name, recipe) in enumerate(ENCODES if model == BIG else ENCODES[:1]):
            measure(name, model, {"op": "encode", "src": models[model], "recipe": recipe}, keep=i == 0)
        measure(DECODE, model, {"op": "decode", "src": kept})
        shutil.rmtree(kept, ignore_errors=True)
    base = rows[0]["mb_per_s"]
    for row in rows:
        row["vs_baseline"] = round(row["mb_per_s"] / base, 3)
    rss = {(r["run"], r["model"]): r["peak_rss_mb"] for r in rows}
    return {
        "checkpoint": "Llama architecture, transformers random init, fp32 safetensors in 500 MB shards "
                      "(throughput/memory only, not a quality result)",
        "bytes": size, "cpus": os.cpu_count(), "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "runs": rows,
        "peak_rss_mb_by_model_size": {what: {m: rss[(what, m)] for m in (SMALL, BIG, LARGER)}
                                      for what in (ENCODES[0][0], DECODE)},
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 130)
    big = result["bytes"][BIG] / 1e9
    table = Table(title=f"kbit encode / decode vs plain safetensors — random-init Llama, {big:.2f} GB fp32, "
                        f"{result['cpus']} CPUs, load average {result['load_average'][0]} -> {result['load_average'][1]}")
    for col in ("run", "model", "seconds", "MB/s", "vs baseline", "output GB", "peak RSS MB", "RSS / file"):
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    for r in result["runs"]:
        table.add_row(r["run"], r["model"], f"{r['seconds']:.2f}", f"{r['mb_per_s']:.0f}", f"{r['vs_baseline']:.2f}x",
                      f"{r['output_gb']:.2f}", f"{r['peak_rss_mb']}", f"{r['peak_rss_over_file_size']:.2f}")
    console.print(table)
    sizes = Table(title="Peak RSS (MB) against model size: same layer shapes, 1 / 20 / 40 layers")
    sizes.add_column("run")
    for m in (SMALL, BIG, LARGER):
        sizes.add_column(f"{m} model", justify="right")
    for what, by_model in result["peak_rss_mb_by_model_size"].items():
        sizes.add_row(what, *(str(by_model[m]) for m in (SMALL, BIG, LARGER)))
    console.print(sizes)
    start = result["runs"][1]["startup_rss_mb"]
    console.print(f"Each process starts at ~{start} MB (Python + torch + kbit); the rest is the few tensors in flight "
                  "(the largest here, embed_tokens and lm_head, are 131 MB each in fp32). nf4 runs use the data-free "
                  "default (plain absmax, scale_search 1) unless marked; int8 uses 1 too. Weights are random: "
                  "a throughput and memory benchmark, not a quality one.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kbit-bench"),
                    help="where the checkpoints are built (once) and outputs written; not in the repo")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from rich.console import Console

    err = Console(stderr=True)
    result = run(args.cache, (lambda m: None) if args.json else (lambda m: err.print(f"[dim]{m}[/dim]")))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
