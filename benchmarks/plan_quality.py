"""`kbit plan` against uniform quantization, on the model's own loss, in one run per model.

For each model: the dense fp32 model scores the evaluation text once; then
1. predictor check: single tensors quantized alone (every target of stories260K, a sample of SmolLM2's) under
   a few choices; the measured ΔNLL / KL vs each predictor (weight error, activation-weighted, Fisher-weighted):
   Pearson and Spearman correlations (the allocation only needs the ranking right, plus additivity).
2. quality: for each budget (bits per quantized parameter), the planned mix (data-free and calibrated) vs every
   uniform configuration of the grid near that budget, and bitsandbytes NF4 b64 as a reference row.
Quantized models are simulated (each tensor replaced by dequantize(quantize(W)), the weights a kbit encode
decodes to, bit for bit); one encode per model checks predicted bytes == the bytes on disk.
Calibration (wikitext) and evaluation (TinyStories) are different texts: the plans never see the scored text.

    python benchmarks/plan_quality.py --model kbitcli/assets/stories260K --model /work/smollm2-dense --json out/plan_quality.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kbitcli.allocate.choices import Choice, parse_choices  # noqa: E402
from kbitcli.allocate.choices import DEFAULT_CHOICES  # noqa: E402
from kbitcli.allocate.planner import measure_model, plan  # noqa: E402
from kbitcli.allocate.sensitivity import collect_importance, tensor_losses  # noqa: E402
from kbitcli.bench import evaluate as ev  # noqa: E402
from kbitcli.calibration.data import Calibration  # noqa: E402
from kbitcli.core.blockwise import dequantize, quantize  # noqa: E402
from kbitcli.encode import encode, plan_source  # noqa: E402
from kbitcli.formats.source import open_source  # noqa: E402
from kbitcli.hf import name_mapper  # noqa: E402
from kbitcli.models.load import load_model  # noqa: E402
from kbitcli.recipes import Recipe, from_dict  # noqa: E402
from kbitcli import safe_yaml  # noqa: E402

# every row, planned or uniform, is the paper's round-to-nearest with plain absmax scales (scale_search 1), so
# the comparison is of the allocation alone, whatever encode's default scale search is at the time
RTN = Recipe(scale_search=1)
PROBE_CHOICES = [Choice(2, 64, "nf"), Choice(3, 64, "nf"), Choice(4, 64, "nf"), Choice(3, 128, "int")]
UNIFORM = parse_choices("bits=2..8 block=32,64,128 dtype=nf,int dq=true,false")


@contextlib.contextmanager
def replaced(model, new: dict):
    """Inside the block the named model parameters hold the given values; restored on exit."""
    params = dict(model.named_parameters())
    to_model = name_mapper(set(params), getattr(model, "base_model_prefix", ""))
    saved = {}
    with torch.no_grad():
        for n, v in new.items():
            p = params[to_model(n)]
            saved[n] = p.detach().clone()
            p.copy_(v.view_as(p))
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[to_model(n)].copy_(v)


def simulate(src, specs: dict) -> dict:
    return {n: dequantize(quantize(src.get(n).float(), s, n), torch.float32) for n, s in specs.items()}


def pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy) if sx and sy else float("nan")


def ranks(x):
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for pos, i in enumerate(order):
        r[i] = float(pos)
    return r


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def score(ref, base, model):
    r = ref.compare(model, per_window=True)
    return {"delta_nll": r["nll"] - base["nll"], "delta_nll_se": r["delta_nll_se"], "kl": r["kl_divergence"],
            "window_delta_nll": r["window_delta_nll"]}


def paired_ratio_se(a: dict, b: dict) -> float | None:
    """Standard error of a's ΔNLL / b's, both scored on the same windows (rows of an earlier run given with
    --uniform-from may lack the per-window sums: None)."""
    if "window_delta_nll" not in a or "window_delta_nll" not in b:
        return None
    return ev.ratio_se(a["window_delta_nll"], b["window_delta_nll"])


def printable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "window_delta_nll"}


def predictors(path, src, targets, calib, probe_names):
    """name -> {kind: [predicted loss per PROBE_CHOICES]}."""
    out = {n: {} for n in probe_names}
    imps = {"weight": None}
    for kind in ("activation", "fisher"):
        imps[kind], _ = collect_importance(path, probe_names, calib, kind)
    for n in probe_names:
        t = targets[n]
        specs = [c.spec(t.shape) for c in PROBE_CHOICES]
        for kind, imp in imps.items():
            out[n][kind] = tensor_losses(src.get(n), specs, None if imp is None else imp[n])
    return out


def run_model(path, args):
    t_model = time.time()
    dense, tok = load_model(path, dtype="fp32")
    text = ev.read_text(args.eval)
    ctx, _ = ev.check_context(args.context, None, ev.max_positions(path), 512)
    windows, _ = ev.causal_windows(tok, text, ctx, ctx, "auto", args.max_tokens)
    ref = ev.CausalReference(dense, windows, cache_bytes=4 << 30)
    base = ref.baseline()
    src = open_source(path)
    targets = {t.name: t for t in plan_source(src, Recipe()).quantized}
    qparams = sum(t.numel for t in targets.values())
    calib = Calibration(args.calib, args.calib_tokens, 0)
    res = {"model": path, "dense_nll": base["nll"], "eval_tokens": ref.tokens, "correlation": {}, "rows": []}
    print(f"{path}: dense nll {base['nll']:.4f} on {ref.tokens} tokens", file=sys.stderr, flush=True)

    # 1. predictors vs the measured loss of single tensors quantized alone (--probe-tensors -1: skipped)
    if args.probe_tensors >= 0:
        probe(path, src, targets, calib, dense, ref, base, args, res)
    run_plans(path, src, targets, calib, dense, ref, base, args, res, qparams)
    res["seconds"] = round(time.time() - t_model, 1)
    return res


def probe(path, src, targets, calib, dense, ref, base, args, res):
    names = sorted(targets)
    if args.probe_tensors and len(names) > args.probe_tensors:
        names = sorted(random.Random(0).sample(names, args.probe_tensors))
    pred = predictors(path, src, targets, calib, names)
    meas = []
    for n in names:
        for ci, c in enumerate(PROBE_CHOICES):
            with replaced(dense, simulate(src, {n: c.spec(targets[n].shape)})):
                m = score(ref, base, dense)
            meas.append((n, ci, m))
    for kind in ("weight", "activation", "fisher"):
        p = [pred[n][kind][ci] for n, ci, _ in meas]
        for metric in ("delta_nll", "kl"):
            y = [m[metric] for _, _, m in meas]
            res["correlation"][f"{kind}/{metric}"] = {"pearson": pearson(p, y), "spearman": spearman(p, y)}
    res["probe"] = {"tensors": len(names), "choices": [c.label() for c in PROBE_CHOICES], "points": len(meas)}
    print(json.dumps(res["correlation"]), file=sys.stderr, flush=True)



def run_plans(path, src, targets, calib, dense, ref, base, args, res, qparams):
    # 2. plans vs uniform configurations, and bnb NF4
    def eval_specs(specs):
        with replaced(dense, simulate(src, specs)):
            return score(ref, base, dense)

    plan_timing = {}
    measured = {}
    # plan kinds: data-free weight error; Fisher on the calibration file; Fisher on text the model samples itself
    kinds = {"weight": (None, "weight"), "fisher": (calib, "fisher"),
             "fisher-self": (Calibration("self", args.calib_tokens, 0), "fisher")}
    kinds = {k: kinds[k] for k in args.kinds.split(",")}
    for kind, (c, sens) in kinds.items():
        t0 = time.time()
        measured[kind] = measure_model(path, DEFAULT_CHOICES, RTN, c, sens)
        res[f"sensitivity_seconds_{kind}"] = round(time.time() - t0, 1)
    for budget in args.budgets:
        for kind, (c, sens) in kinds.items():
            t0 = time.time()
            p = plan(path, str(budget), calib=c, sensitivity=sens, measured=measured[kind], recipe=RTN)
            plan_timing[f"{kind}@{budget}"] = time.time() - t0
            r = from_dict(safe_yaml.load(p["recipe_yaml"], "plan"), "plan")
            specs = {t.name: t.spec for t in plan_source(src, r).quantized}
            assert all(s.scale_search == 1 for s in specs.values())
            m = eval_specs(specs)
            row = {"config": f"plan {budget} ({kind})", "kind": "plan", "budget": budget, "sensitivity": kind,
                   "bits": p["predicted"]["bits_per_param_quantized"], "predicted_bytes": p["predicted"]["bytes_out"],
                   "predicted_loss": p["predicted"]["loss"], "plan_seconds": round(plan_timing[f"{kind}@{budget}"], 1), **m}
            res["rows"].append(row)
            print(json.dumps(printable(row)), file=sys.stderr, flush=True)
    lo, hi = min(args.budgets), max(args.budgets)
    if args.uniform_from:  # uniform and reference rows of an earlier run on the same model and tokens
        with open(args.uniform_from) as fh:
            earlier = next(r for r in json.load(fh) if r["model"] == path)
        assert abs(earlier["dense_nll"] - base["nll"]) < 1e-9, "another evaluation text or token count"
        res["rows"] += [r for r in earlier["rows"] if r["kind"] != "plan"]
    for c in UNIFORM:
        if args.uniform_from or c.dtype not in args.uniform_dtypes.split(",") or \
                str(c.block_size) not in args.uniform_blocks.split(","):
            continue
        bits = sum(c.cost_bits(t.shape) for t in targets.values()) / qparams
        if not lo - 0.2 <= bits <= hi + 0.3:
            continue
        m = eval_specs({n: c.spec(t.shape) for n, t in targets.items()})
        row = {"config": f"uniform {c.label()}", "kind": "uniform", "bits": bits, **m}
        res["rows"].append(row)
        print(json.dumps(printable(row)), file=sys.stderr, flush=True)
    try:
        if args.uniform_from:
            raise ImportError  # the reference row came with the uniform ones
        import bitsandbytes.functional as F

        new = {}
        for n in targets:
            w = src.get(n).float()
            q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
            new[n] = F.dequantize_4bit(q, st).float().view_as(w)
        with replaced(dense, new):
            res["rows"].append({"config": "bitsandbytes NF4 b64 (fp32 absmax)", "kind": "reference", "bits": 4.5,
                                **score(ref, base, dense)})
    except ImportError:
        pass

    # 3. predicted bytes == encoded bytes, on one real encode of the middle budget's calibrated plan
    mid = sorted(args.budgets)[len(args.budgets) // 2]
    last = list(kinds)[-1]
    p = plan(path, str(mid), calib=kinds[last][0], sensitivity=kinds[last][1], measured=measured[last], recipe=RTN)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rpath = os.path.join(tmp, "plan.yaml")
        with open(rpath, "w") as fh:
            fh.write(p["recipe_yaml"])
        from kbitcli.recipes import load_recipe

        enc = encode(path, os.path.join(tmp, "q"), load_recipe(rpath))
    res["bytes_check"] = {"budget": mid, "predicted_bytes": p["predicted"]["bytes_out"], "encoded_bytes": enc["bytes_out"],
                          "predicted_bits": p["predicted"]["bits_per_param_quantized"],
                          "encoded_bits": enc["bits_per_param_quantized"]}
    res["comparison"] = compare(res["rows"], args.budgets)


def compare(rows, budgets):
    """Per budget and plan kind: the uniform reference is the uniform configuration with the fewest bits at or
    above the plan's bits (ties: the best of them); also the best uniform within +0.3 bits of the plan."""
    uni = [r for r in rows if r["kind"] == "uniform"]
    out = []
    for b in budgets:
        for r in (r for r in rows if r["kind"] == "plan" and r["budget"] == b):
            above = [u for u in uni if u["bits"] >= r["bits"] - 1e-9]
            if not above:
                continue
            least = min(u["bits"] for u in above)
            ref = min((u for u in above if u["bits"] <= least + 1e-6), key=lambda u: u["delta_nll"])
            window = min((u for u in above if u["bits"] <= r["bits"] + 0.3), key=lambda u: u["delta_nll"], default=ref)
            out.append({"budget": b, "plan": r["config"], "plan_bits": r["bits"], "plan_delta_nll": r["delta_nll"],
                        "uniform": ref["config"], "uniform_bits": ref["bits"], "uniform_delta_nll": ref["delta_nll"],
                        "ratio": r["delta_nll"] / ref["delta_nll"], "ratio_se": paired_ratio_se(r, ref),
                        "best_uniform_within_0.3": window["config"], "best_uniform_within_0.3_bits": window["bits"],
                        "best_uniform_within_0.3_delta_nll": window["delta_nll"],
                        "ratio_within_0.3": r["delta_nll"] / window["delta_nll"]})
    return out


def correlation_table(res):
    out = ["| predictor | Pearson ΔNLL | Spearman ΔNLL | Pearson KL | Spearman KL |", "|---|---|---|---|---|"]
    c = res["correlation"]
    for kind in ("weight", "activation", "fisher"):
        out.append(f"| {kind} | {c[kind + '/delta_nll']['pearson']:.3f} | {c[kind + '/delta_nll']['spearman']:.3f} | "
                   f"{c[kind + '/kl']['pearson']:.3f} | {c[kind + '/kl']['spearman']:.3f} |")
    out.append(f"\n({res['probe']['tensors']} tensors x {', '.join(res['probe']['choices'])}, each quantized alone)\n")
    return out


def markdown(results):
    out = []
    for res in results:
        name = os.path.basename(os.path.normpath(res["model"]))
        out.append(f"\n### {name} (dense nll {res['dense_nll']:.4f}, {res['eval_tokens']} tokens)\n")
        if not res["correlation"]:
            out.append("(predictor correlations not measured on this model)\n")
        else:
            out += correlation_table(res)
        out.append("| budget | plan | bits | ΔNLL | uniform (fewest bits ≥ plan) | bits | ΔNLL | ratio | "
                   "best uniform ≤ +0.3 bit | ΔNLL | ratio |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in res["comparison"]:
            se = f" ± {c['ratio_se']:.3f}" if c.get("ratio_se") is not None else ""  # paired, over the windows
            out.append(f"| {c['budget']} | {c['plan']} | {c['plan_bits']:.4f} | {c['plan_delta_nll']:+.4f} | {c['uniform']} | "
                       f"{c['uniform_bits']:.4f} | {c['uniform_delta_nll']:+.4f} | {c['ratio']:.3f}x{se} | "
                       f"{c['best_uniform_within_0.3']} ({c['best_uniform_within_0.3_bits']:.3f}) | "
                       f"{c['best_uniform_within_0.3_delta_nll']:+.4f} | {c['ratio_within_0.3']:.2f}x |")
        out.append("\n| config | bits | ΔNLL ± standard error | KL |\n|---|---|---|---|")
        for r in sorted(res["rows"], key=lambda r: r["bits"]):
            se = f" ± {r['delta_nll_se']:.4f}" if r.get("delta_nll_se") is not None else ""
            out.append(f"| {r['config']} | {r['bits']:.4f} | {r['delta_nll']:+.4f}{se} | {r['kl']:.4f} |")
        b = res["bytes_check"]
        out.append(f"\nbytes: predicted {b['predicted_bytes']:,}, encoded {b['encoded_bytes']:,} "
                   f"(bits/param {b['predicted_bits']:.4f} vs {b['encoded_bits']}); model run {res['seconds']} s")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--calib", default="kbitcli/assets/text/wikitext2_valid_first100k.txt")
    ap.add_argument("--eval", default="kbitcli/assets/text/tinystories_v2_valid_first48k.txt")
    ap.add_argument("--budgets", default="3.25,3.5,4.25")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--probe-tensors", type=int, default=0, help="0: every target tensor")
    ap.add_argument("--uniform-dtypes", default="nf,int")
    ap.add_argument("--uniform-blocks", default="32,64,128")
    ap.add_argument("--kinds", default="weight,fisher,fisher-self", help="plan sensitivities to compare")
    ap.add_argument("--uniform-from", default=None, help="JSON of an earlier run: reuse its uniform/reference rows")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    results = [run_model(m, args) for m in args.model]
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
