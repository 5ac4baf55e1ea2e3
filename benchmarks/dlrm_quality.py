"""What k bits cost a DLRM-style click model (examples/dlrm.py): quality, table memory and lookup time, one run.

    .venv/bin/python benchmarks/dlrm_quality.py [--steps 250] [--bits 2,3,4,5,6,7,8] [--dtypes nf,int]
        [--block 64] [--test 50000] [--world 1234] [--recipe FILE] [--lookup nf2,nf4,nf8,int4,int8] [--runs 21] [--json]

Trains the example's DLRM once (fixed seeds, one thread: 8 EmbeddingBag tables of 2^14..2^16 rows x 32, 33.5
MB of fp32) on synthetic clicks, then encodes it with `kbit.encode` at every k and dtype, twice:
  - tables: the embedding tables at k bits, the MLPs dense;
  - all:    the MLPs' Linear layers at k bits too.
Each k-bit model is scored on held-out clicks (another draw of the same hidden world): test AUC and log-loss
next to the dense model's from the same run, and the tables' resident bytes (codes, scales, codebook: what
the k-bit modules hold) against fp32, as bits per table parameter.
Lookup: KbitEmbedding / KbitEmbeddingBag against nn.Embedding / nn.EmbeddingBag over the same decoded table
(the largest, 65,536 x 32), 4,096 ids, both Zipf-distributed ids from the test set (as the model sees them:
many repeats) and uniform random ids (nearly all distinct); median of --runs interleaved runs, one thread.
The family recipe (--recipe, default recipes/dlrm-tables-nf4.yaml) is scored like the grid and timed both ways,
and the whole model's forward on 4,096 clicks is timed against the dense model's. --world draws another hidden
world (a different data set and model) to see which differences hold.
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
from kbitcli.recipes import load_recipe  # noqa: E402
from dlrm import DLRM, auc, batch, log_loss, score, synthetic_clicks, train  # noqa: E402

TABLES = r"re:tables\.\d+"
MLPS = r"re:(bottom|top)\.\d+"
RECIPE = os.path.join(ROOT, "recipes", "dlrm-tables-nf4.yaml")


def table_bytes(model: nn.Module) -> int:
    """Resident bytes of the model's embedding tables: every tensor their modules hold."""
    return sum(t.numel() * t.element_size() for t in model.tables.state_dict().values())


def quality(model, test, dense_score, dtypes, bits, block, log) -> list[dict]:
    rows = []
    n_table = sum(t.weight.numel() for t in model.tables)
    last = f"top.{len(model.top) - 1}"  # the logit layer: [1, 32], smaller than a block; 32 params stay fp32
    for dtype in dtypes:
        for k in bits:
            for scope, targets in (("tables", [TABLES]), ("all", [TABLES, MLPS])):
                recipe = {"bits": k, "block_size": block, "dtype": dtype, "targets": targets,
                          "ignore": [] if scope == "tables" else [last]}
                q = kbit.encode(model, recipe=recipe)
                s, mem, tb = score(q, test), kbit.memory(q), table_bytes(q)
                rows.append({"dtype": dtype, "bits": k, "scope": scope, "auc": s["auc"], "log_loss": s["log_loss"],
                             "auc_diff": s["auc"] - dense_score["auc"],
                             "auc_ratio": s["auc"] / dense_score["auc"],
                             "log_loss_diff": s["log_loss"] - dense_score["log_loss"],
                             "table_bytes": tb, "table_bits_per_param": tb * 8 / n_table,
                             "total_bytes": mem["total_bytes"], "kbit_module_bytes": mem["kbit_module_bytes"]})
                log(f"{dtype}{k} {scope}: AUC {s['auc']:.4f} log-loss {s['log_loss']:.4f}")
    return rows


def recipe_rows(model, test, dense_score, paths, log) -> list[dict]:
    """The family's recipe files, scored in the same run as the grid."""
    rows = []
    n_table = sum(t.weight.numel() for t in model.tables)
    for path in paths:
        q = kbit.encode(model, recipe=path)
        s, tb = score(q, test), table_bytes(q)
        rows.append({"recipe": os.path.relpath(path, ROOT), "auc": s["auc"], "log_loss": s["log_loss"],
                     "auc_diff": s["auc"] - dense_score["auc"], "log_loss_diff": s["log_loss"] - dense_score["log_loss"],
                     "table_bytes": tb, "table_bits_per_param": tb * 8 / n_table,
                     "total_bytes": kbit.memory(q)["total_bytes"]})
        log(f"{path}: AUC {s['auc']:.4f} log-loss {s['log_loss']:.4f}")
    return rows


def lookup_times(model, test, configs, runs, n_ids=4096) -> list[dict]:
    """k-bit vs dense lookups of one table, interleaved run by run; the dense module holds the decoded table,
    so both return the same rows. configs: (label, recipe settings) pairs."""
    weight = model.tables[0].weight.detach()
    zipf_ids = test["sparse"][0][0][:n_ids]
    zipf_offsets = test["sparse"][0][1][test["sparse"][0][1] < n_ids]
    uniform_ids = torch.randint(0, weight.shape[0], (n_ids,), generator=torch.Generator().manual_seed(0))
    out = []
    for label, settings in configs:
        pair = nn.ModuleDict({"emb": nn.Embedding.from_pretrained(weight),
                              "bag": nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum")})
        q = kbit.encode(pair, recipe={**settings, "targets": ["emb", "bag"]})
        decoded = q.emb.dequantize_table()
        dense = {"emb": nn.Embedding.from_pretrained(decoded), "bag": nn.EmbeddingBag.from_pretrained(decoded, mode="sum")}
        for ids_name, ids in (("zipf", zipf_ids), ("uniform", uniform_ids)):
            offsets = zipf_offsets if ids_name == "zipf" else torch.arange(0, n_ids, 4)
            calls = {"KbitEmbedding": lambda: q.emb(ids), "nn.Embedding": lambda: dense["emb"](ids),
                     "KbitEmbeddingBag": lambda: q.bag(ids, offsets), "nn.EmbeddingBag": lambda: dense["bag"](ids, offsets)}
            with torch.inference_mode():
                assert torch.equal(calls["KbitEmbedding"](), calls["nn.Embedding"]())
                bag_err = (calls["KbitEmbeddingBag"]() - calls["nn.EmbeddingBag"]()).abs().max().item()
                times = {name: [] for name in calls}
                for _ in range(runs):
                    for name, call in calls.items():
                        t0 = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            out.append({"config": label, "ids": ids_name, "distinct_ids": int(ids.unique().numel()),
                        "bags": len(offsets), "ms": med,
                        "embedding_ratio": med["KbitEmbedding"] / med["nn.Embedding"],
                        "bag_ratio": med["KbitEmbeddingBag"] / med["nn.EmbeddingBag"], "bag_max_abs_diff": bag_err})
    return out


def forward_times(model, q, test, runs, n=4096) -> dict:
    """The whole model on a batch of n clicks, dense vs k-bit, interleaved: what the lookups cost end to end."""
    dense, sparse, _ = batch(test, 0, n)
    times = {"dense": [], "kbit": []}
    with torch.inference_mode():
        for _ in range(runs):
            for name, m in (("dense", model), ("kbit", q)):
                t0 = time.perf_counter()
                m(dense, sparse)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    return {"clicks": n, "ms": med, "ratio": med["kbit"] / med["dense"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250, help="training steps of 2,048 clicks (one pass)")
    ap.add_argument("--test", type=int, default=50_000, help="held-out clicks scored")
    ap.add_argument("--world", type=int, default=1234, help="seed of the hidden world (id latents, popularity)")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--dtypes", default="nf,int")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--lookup", default="nf2,nf4,nf8,int4,int8", help="dtype+k of the lookup timings (block "
                    "--block), besides the recipe's own settings")
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--recipe", action="append", help="recipe file to score too (repeatable; default: "
                    "recipes/dlrm-tables-nf4.yaml)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    dtypes = args.dtypes.split(",")
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(1)
    result = {"load_before": os.getloadavg()[0], "steps": args.steps, "block_size": args.block, "world": args.world}

    torch.manual_seed(0)
    train_set = synthetic_clicks(args.steps * 2048, seed=1, world=args.world)
    test = synthetic_clicks(args.test, seed=2, world=args.world)  # another draw of the same world
    t0 = time.perf_counter()
    model = train(DLRM(), train_set, steps=args.steps)
    result["train_s"] = time.perf_counter() - t0
    dense = score(model, test)
    # the ceiling: scores of the true (noise-free) click logits, which no model can beat on average
    truth = {"auc": auc(test["truth"], test["labels"]), "log_loss": log_loss(test["truth"], test["labels"])}
    n_table = sum(t.weight.numel() for t in model.tables)
    result["dense"] = {**dense, "table_bytes": table_bytes(model), "table_params": n_table,
                       "total_bytes": kbit.memory(model)["total_bytes"], "click_rate": float(test["labels"].mean())}
    result["oracle"] = truth
    log(f"dense: AUC {dense['auc']:.4f} log-loss {dense['log_loss']:.4f} (trained in {result['train_s']:.1f} s); "
        f"oracle AUC {truth['auc']:.4f}")
    result["quality"] = quality(model, test, dense, dtypes, bits, args.block, log)
    result["recipes"] = recipe_rows(model, test, dense, args.recipe or [RECIPE], log)
    configs = [(c, {"bits": int(c.lstrip("abcdefghijklmnopqrstuvwxyz")), "dtype": c.rstrip("0123456789"),
                    "block_size": args.block}) for c in args.lookup.split(",")]
    recipe = load_recipe(args.recipe[0] if args.recipe else RECIPE)
    configs.append((os.path.basename(recipe.source), recipe.settings()))
    result["lookup"] = lookup_times(model, test, configs, args.runs)
    result["forward"] = forward_times(model, kbit.encode(model, recipe=recipe), test, args.runs)
    result["forward"]["recipe"] = os.path.basename(recipe.source)
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    d = result["dense"]
    print(f"load average {result['load_before']:.2f} -> {result['load_after']:.2f}; trained {args.steps} steps in "
          f"{result['train_s']:.1f} s")
    print(f"dense: test AUC {d['auc']:.4f}, log-loss {d['log_loss']:.4f}, tables {d['table_bytes'] / 1e6:.2f} MB "
          f"({n_table:,} params); oracle AUC {truth['auc']:.4f}, log-loss {truth['log_loss']:.4f}")
    print(f"{'dtype':>5} {'k':>2} {'scope':>6} {'AUC':>7} {'dAUC':>8} {'logloss':>8} {'dLL':>8} {'tables MB':>9} "
          f"{'x fp32':>6} {'bits/p':>6}")
    for r in result["quality"]:
        print(f"{r['dtype']:>5} {r['bits']:>2} {r['scope']:>6} {r['auc']:7.4f} {r['auc_diff']:+8.4f} "
              f"{r['log_loss']:8.4f} {r['log_loss_diff']:+8.4f} {r['table_bytes'] / 1e6:9.2f} "
              f"{d['table_bytes'] / r['table_bytes']:6.2f} {r['table_bits_per_param']:6.3f}")
    for r in result["recipes"]:
        print(f"{r['recipe']}: AUC {r['auc']:.4f} ({r['auc_diff']:+.4f}), log-loss {r['log_loss']:.4f} "
              f"({r['log_loss_diff']:+.4f}), tables {r['table_bytes'] / 1e6:.2f} MB ({d['table_bytes'] / r['table_bytes']:.2f}x "
              f"smaller), {r['table_bits_per_param']:.3f} bits/param")
    for r in result["lookup"]:
        ms = r["ms"]
        print(f"lookup {r['config']} 4,096 {r['ids']} ids ({r['distinct_ids']} distinct): KbitEmbedding "
              f"{ms['KbitEmbedding']:.3f} ms vs nn.Embedding {ms['nn.Embedding']:.3f} ms ({r['embedding_ratio']:.1f}x); "
              f"KbitEmbeddingBag {ms['KbitEmbeddingBag']:.3f} ms vs nn.EmbeddingBag {ms['nn.EmbeddingBag']:.3f} ms "
              f"({r['bag_ratio']:.1f}x, {r['bags']} bags)")
    f = result["forward"]
    print(f"whole model, {f['clicks']:,} clicks: {f['recipe']} {f['ms']['kbit']:.2f} ms vs dense {f['ms']['dense']:.2f} ms "
          f"({f['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
