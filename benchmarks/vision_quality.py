"""MobileNetV2 (torchvision's ImageNet weights) at k bits through `kbit.encode(model)`: quality, memory, speed.

    .venv/bin/python benchmarks/vision_quality.py [--crops 10] [--bits 4 6 8] [--repeats 21] [--json]

Quality: for k = 4, 6, 8 (nf, blocks of 64, fp16 scales) and 8-bit int, with every conv and the classifier
k-bit and with the first conv / the classifier / both / the stem and first block kept dense, and for
recipes/cnn-nf4.yaml (and it with --bits 8 --dtype int): top-1 agreement with the dense model and mean
KL(dense || k-bit) of the logits over scikit-image's photos (examples/mobilenet_v2.py: 14 photos x --crops
crops), the parameters quantized, the resident bytes of the whole k-bit model (kbit.memory) vs dense, and the
k-bit modules' resident bits per quantized weight (codes, scales, codebooks, the classifier's fp32 bias).
Every row runs the real k-bit modules (KbitConv, KbitLinear), not dense weights rounded in place.

Speed: KbitConv forward vs nn.Conv2d on MobileNetV2's own layers at their input sizes (the stem 3x3 stride-2
conv, a 3x3 depthwise, two 1x1 pointwise), nf4 blocks of 64, and the whole network with recipes/cnn-nf4.yaml vs
dense, batch 1 and 8: median of --repeats interleaved runs each, 1 thread, a ratio to dense in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import kbitcli.api as kbit  # noqa: E402
from mobilenet_v2 import PHOTOS, agreement, logits, photos, pretrained  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "cnn-nf4.yaml")
STEM = ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]  # the first conv and the first block's two
DENSE_SETS = {"all k-bit": [], "first conv dense": ["features.0.0"], "classifier dense": ["classifier.1"],
              "both dense": ["features.0.0", "classifier.1"], "stem+block 1 dense": STEM}
# (name, input channels and size) of the layers timed: MobileNetV2's own weights at their own input shapes
SPEED_LAYERS = [("features.0.0", "stem 3x3 s2", 3, 224), ("features.3.conv.1.0", "3x3 depthwise", 144, 56),
                ("features.3.conv.0.0", "1x1 pointwise", 24, 56), ("features.18.0", "1x1 pointwise 320->1280", 320, 7)]


def weight_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quality_row(model, x, dense_logits, recipe, label: str, dense_bytes: int) -> dict:
    q = kbit.encode(model, recipe=recipe)
    top1, kl = agreement(dense_logits, logits(q, x))
    params = sum(p.numel() for p in model.parameters())
    quantized = sum(tp.numel for tp in q.kbit_plan.quantized)
    mem = kbit.memory(q)
    return {"config": label, "top1_agreement": round(top1, 4), "kl": round(kl, 5), "quantized_params": quantized,
            "quantized_fraction": round(quantized / params, 4), "resident_bytes": mem["total_bytes"],
            "kbit_module_bytes": mem["kbit_module_bytes"], "vs_dense_bytes": round(mem["total_bytes"] / dense_bytes, 4),
            "kbit_bits_per_quantized_param": round(mem["kbit_module_bytes"] * 8 / quantized, 3)}


def quality(bits_list: list[int], crops: int) -> dict:
    model, x = pretrained(), photos(crops)
    dense_logits = logits(model, x)
    dense_bytes = kbit.memory(model)["total_bytes"]
    layers = weight_layers(model)
    rows = []
    for bits, dtype in [(b, "nf") for b in bits_list] + [(8, "int")]:
        for label, dense in DENSE_SETS.items():
            recipe = {"bits": bits, "block_size": 64, "dtype": dtype, "targets": [n for n in layers if n not in dense]}
            row = quality_row(model, x, dense_logits, recipe, label, dense_bytes)
            rows.append({"bits": bits, "dtype": dtype, **row})
            print(f"  {dtype}{bits} {label}: done", file=sys.stderr, flush=True)
    for flags, label in [({}, "recipes/cnn-nf4.yaml"), ({"bits": 8, "dtype": "int"}, "cnn-nf4 --bits 8 --dtype int")]:
        r = kbit.with_flags(kbit.load_recipe(RECIPE), **flags)
        rows.append({"bits": r.bits, "dtype": r.dtype, **quality_row(model, x, dense_logits, r, label, dense_bytes)})
    return {"inputs": len(x), "photos": len(PHOTOS), "crops_per_photo": crops, "dense_bytes": dense_bytes,
            "params": sum(p.numel() for p in model.parameters()), "rows": rows}


def timed(fn, x, out: list) -> None:
    """Appends the milliseconds one call of fn(x) takes."""
    t = time.perf_counter()
    fn(x)
    out.append((time.perf_counter() - t) * 1e3)


@torch.no_grad()
def conv_speed(repeats: int) -> list[dict]:
    model = pretrained()
    q = kbit.encode(model, recipe={"bits": 4, "block_size": 64, "dtype": "nf", "double_quant": True,
                                   "targets": [name for name, *_ in SPEED_LAYERS]})
    dense_mods, kbit_mods = dict(model.named_modules()), dict(q.named_modules())
    rows = []
    for name, what, channels, size in SPEED_LAYERS:
        dense, kconv = dense_mods[name], kbit_mods[name]
        assert isinstance(kconv, kbit.KbitConv), f"{name} is a {type(kconv).__name__}"
        for batch in (1, 8):
            x = torch.randn(batch, channels, size, size)
            dense(x), kconv(x)  # warm-up
            td, tk = [], []
            for _ in range(repeats):  # interleaved: both see the same machine load
                timed(dense, x, td)
                timed(kconv, x, tk)
            d, k = statistics.median(td), statistics.median(tk)
            rows.append({"layer": name, "what": what, "weight_shape": list(dense.weight.shape), "batch": batch,
                         "input": [batch, channels, size, size], "dense_ms": round(d, 4), "kbit_ms": round(k, 4),
                         "ratio_vs_dense": round(k / d, 3)})
    # the whole network with recipes/cnn-nf4.yaml: every k-bit layer decodes its weight on every forward
    q = kbit.encode(model, recipe=RECIPE)
    for batch in (1, 8):
        x = photos(1)[:batch]
        model(x), q(x)
        td, tk = [], []
        for _ in range(repeats):
            timed(model, x, td)
            timed(q, x, tk)
        d, k = statistics.median(td), statistics.median(tk)
        rows.append({"layer": "(whole model)", "what": "cnn-nf4.yaml", "batch": batch, "input": list(x.shape),
                     "dense_ms": round(d, 4), "kbit_ms": round(k, 4), "ratio_vs_dense": round(k / d, 3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crops", type=int, default=10, help="crops per photo (1..10); 14 photos")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {"quality": quality(args.bits, args.crops), "conv_speed": conv_speed(args.repeats), "threads": 1}
    if args.json:
        print(json.dumps(result))
        return
    qd = result["quality"]
    print(f"MobileNetV2, {qd['inputs']} inputs ({qd['photos']} photos x {qd['crops_per_photo']} crops), "
          f"dense {qd['dense_bytes'] / 1e6:.2f} MB resident, {qd['params']:,} params")
    print(f"{'type':5} {'config':28} {'top-1 agr':>9} {'KL nats':>9} {'quantized':>10} {'frac':>6} {'MB':>6} "
          f"{'vs dense':>8} {'bits/q-param':>12}")
    for r in qd["rows"]:
        print(f"{r['dtype'] + str(r['bits']):5} {r['config']:28} {r['top1_agreement']:>9.2%} {r['kl']:>9.5f} "
              f"{r['quantized_params']:>10,} {r['quantized_fraction']:>6.3f} {r['resident_bytes'] / 1e6:>6.2f} "
              f"{r['vs_dense_bytes']:>8.3f} {r['kbit_bits_per_quantized_param']:>12.3f}")
    print("\nKbitConv (nf4, block 64, double-quant) forward vs nn.Conv2d, and the whole model with cnn-nf4.yaml vs "
          "dense; 1 thread, median of interleaved runs")
    for r in result["conv_speed"]:
        print(f"  {r['layer']:20} {r['what']:24} batch {r['batch']}: dense {r['dense_ms']:.3f} ms, "
              f"k-bit {r['kbit_ms']:.3f} ms, {r['ratio_vs_dense']:.2f}x dense")


if __name__ == "__main__":
    main()
