"""What batch-1 decode's integer path costs in model loss: every k-bit linear run row by row through the fused
kernel (what `kbit generate` does a token at a time), exact fp32 walk vs the integer path (csrc/kbit_int16.h),
on the same windows, paired, beside the slab path (prefill / `kbit bench ppl`) as the reference.

    python benchmarks/decode_quality.py --model /path/smollm2-dense --quant /path/smollm2-nf4 \\
        --eval wikitext2_valid_heldout.txt [--max-tokens 8192] [--json]

Each configuration is encoded beforehand (`kbit encode DENSE QUANT --recipe ...`); --quant may be given several
times. Row by row costs ~200 kernel calls per token: 8k tokens of SmolLM2-135M take ~2.5 min per mode.
Reports ΔNLL vs dense (± its standard error over windows), KL(dense || quant), top-1 agreement, and the integer
path's ΔNLL as a ratio of the exact path's with its paired standard error; --bnb adds bitsandbytes NF4 on the
same 4-bit layers and windows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kbitcli.bench import evaluate as ev  # noqa: E402
from kbitcli.core import matvec  # noqa: E402
from kbitcli.models.kbit_linear import KbitLinear  # noqa: E402
from kbitcli.models.load import load_model  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from calibration_quality import bnb_model  # noqa: E402

SLAB_FORWARD = KbitLinear.forward


def row_by_row(self: KbitLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward a decode step runs, one row of x at a time through the kernel, for every row of a window."""
    lib = matvec.kernel()
    pw = self.packed_weight()
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = torch.cat([pw.matmul(lib, rows[i : i + 1]) for i in range(rows.shape[0])])
    out = out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
    return out if self.bias is None else out + self.bias


def score(ref: ev.CausalReference, quant, mode: str) -> dict:
    KbitLinear.forward = SLAB_FORWARD if mode == "slab" else row_by_row
    old = matvec.set_exact(mode != "integer")
    try:
        t0 = time.perf_counter()
        out = ref.compare(quant, per_window=True)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    finally:
        KbitLinear.forward = SLAB_FORWARD
        matvec.set_exact(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the dense model folder")
    ap.add_argument("--quant", action="append", required=True, help="an encoded k-bit folder (repeatable)")
    ap.add_argument("--eval", required=True, help="text to score (never used to calibrate or tune)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bnb", action="store_true", help="also score bitsandbytes NF4 (blocks of 64, its own "
                    "quantize_4bit / dequantize_4bit; double quant where the k-bit model has it) on the same layers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if matvec.kernel() is None:
        sys.exit("decode_quality: the fused kernel is unavailable here (no compiler?): nothing to compare")
    dense, tok = load_model(args.model)
    dense.eval()
    windows, _ = ev.causal_windows(tok, ev.read_text(args.eval), args.context, args.context, max_tokens=args.max_tokens)
    ref = ev.CausalReference(dense, windows)
    report = {"model": args.model, "eval": args.eval, "tokens": ref.tokens, "windows": len(windows),
              "dense_nll": ref.baseline()["nll"], "kernel": matvec.describe(), "configs": {}}
    if not args.json:
        print(f"{args.model}: dense nll {report['dense_nll']:.4f} over {ref.tokens} tokens ({len(windows)} windows); "
              f"kernel {report['kernel']}")
    for path in args.quant:
        quant = load_model(path)[0].eval()
        res = {mode: score(ref, quant, mode) for mode in ("slab", "exact", "integer")}
        e, i = res["exact"].pop("window_delta_nll"), res["integer"].pop("window_delta_nll")
        res["slab"].pop("window_delta_nll")
        res["integer_over_exact"] = {"delta_nll": sum(i) / sum(e), "se": ev.ratio_se(i, e),
                                     "kl": res["integer"]["kl_divergence"] / res["exact"]["kl_divergence"]}
        if args.bnb:
            four = [n for n, m in quant.named_modules() if isinstance(m, KbitLinear) and m.spec.bits == 4]
            dq = any(m.spec.double_quant for m in quant.modules() if isinstance(m, KbitLinear))
            bnb = bnb_model(dense, [f"{n}.weight" for n in four], double_quant=dq)
            res["bitsandbytes"] = ref.compare(bnb)
            res["bitsandbytes"]["double_quant"] = dq
            del bnb
        report["configs"][path] = res
        if not args.json:
            for mode in ("slab", "exact", "integer"):
                r = res[mode]
                print(f"  {os.path.basename(path.rstrip('/')):16s} {mode:8s} ΔNLL {r['delta_nll']:+.5f} ± "
                      f"{r['delta_nll_se']:.5f}  KL {r['kl_divergence']:.5f}  top-1 {r['top1_agreement']:.4f}  "
                      f"({r['seconds']:.0f} s)")
            if "bitsandbytes" in res:
                r = res["bitsandbytes"]
                print(f"  {'bitsandbytes NF4' + (' dq' if r['double_quant'] else ''):25s} ΔNLL {r['delta_nll']:+.5f} ± "
                      f"{r['delta_nll_se']:.5f}  KL {r['kl_divergence']:.5f}  top-1 {r['top1_agreement']:.4f}")
            q = res["integer_over_exact"]
            print(f"  integer / exact: ΔNLL {q['delta_nll']:.4f} ± {q['se']:.4f}, KL {q['kl']:.4f}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
