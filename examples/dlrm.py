"""A DLRM-style click model, trained on synthetic clicks, encoded to k bits from Python, scored and saved.

    .venv/bin/python examples/dlrm.py [--recipe recipes/dlrm-tables-nf4.yaml] [--out DIR [--force]] [--steps 250]

DLRM (Naumov et al. 2019): one embedding table per sparse feature (multi-hot bags summed by nn.EmbeddingBag),
a bottom MLP on the dense features, the pairwise dot products of all those vectors, a top MLP to one logit.
The tables hold nearly all the parameters, so they are what k bits must shrink; `kbit.encode` turns each into
a KbitEmbeddingBag that keeps only codes and scales and decodes just the rows a batch looks up.
The definitions here are imported by benchmarks/dlrm_quality.py and tests/test_dlrm.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # run from a checkout without installing

TABLES = (1 << 16, 1 << 16, 1 << 15, 1 << 15, 1 << 14, 1 << 14, 1 << 14, 1 << 14)  # 262,144 rows in all
DIM, DENSE = 32, 13  # 33.5 MB of fp32 tables; 13 dense features as in Criteo


def mlp(sizes, last_relu: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if last_relu or i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """tables.<i>: EmbeddingBag(sum) per sparse feature (bags=False: nn.Embedding, bags summed here);
    bottom.<j> / top.<j>: the MLPs' Linear layers (ReLUs at odd indices)."""

    def __init__(self, table_sizes=TABLES, dim=DIM, dense_features=DENSE, bottom=(64,), top=(64, 32), bags=True):
        super().__init__()
        make = (lambda n: nn.EmbeddingBag(n, dim, mode="sum", sparse=True)) if bags else \
            (lambda n: nn.Embedding(n, dim, sparse=True))
        self.tables = nn.ModuleList(make(n) for n in table_sizes)
        for t in self.tables:  # small init: a row no batch touches keeps it, and it sets the blocks' absmax
            nn.init.normal_(t.weight, std=0.01)
        self.bags = bags
        self.bottom = mlp((dense_features, *bottom, dim), last_relu=True)
        f = len(table_sizes) + 1
        self.top = mlp((dim + f * (f - 1) // 2, *top, 1), last_relu=False)
        self.pairs = [[i for i in range(f) for j in range(i)], [j for i in range(f) for j in range(i)]]  # i > j

    def lookup(self, table, ids, offsets):
        if self.bags:
            return table(ids, offsets)
        bag = torch.repeat_interleave(torch.arange(len(offsets)), torch.diff(offsets, append=torch.tensor([len(ids)])))
        return torch.zeros(len(offsets), table.embedding_dim).index_add_(0, bag, table(ids))

    def forward(self, dense, sparse):
        """dense: [B, dense_features]; sparse: per table (ids, offsets) as nn.EmbeddingBag takes them."""
        x = self.bottom(dense)
        vecs = torch.stack([x] + [self.lookup(t, i, o) for t, (i, o) in zip(self.tables, sparse)], 1)
        dots = torch.bmm(vecs, vecs.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], 1)).squeeze(1)


def synthetic_clicks(n, seed, table_sizes=TABLES, dense_features=DENSE, max_bag=4, latent=8, zipf=1.2, world=1234):
    """n samples of a fixed hidden 'world' (seed `world`: every id's latent vector and bias, Zipf popularity);
    `seed` draws the samples, so train and test are different draws of the same world. Click logit: how the
    bags' latent vectors match a projection of the dense features and each other, plus id biases and noise."""
    w = torch.Generator().manual_seed(world)
    g = torch.Generator().manual_seed(seed)
    T = len(table_sizes)
    dense = torch.randn(n, dense_features, generator=g)
    proj = torch.randn(dense_features, latent, generator=w) / math.sqrt(dense_features)
    u = dense @ proj  # the context the ids must match: ~N(0, 1) per component
    sparse, zs, bias = [], [], torch.zeros(n)
    for size in table_sizes:
        lat = torch.randn(size, latent, generator=w) / math.sqrt(latent)
        b = torch.randn(size, generator=w)
        rank_of = torch.randperm(size, generator=w)  # popular ids are spread over the table, not its first rows
        pop = 1.0 / (rank_of.double() + 1) ** zipf  # Zipf-like popularity
        lens = torch.randint(1, max_bag + 1, (n,), generator=g)
        ids = torch.multinomial(pop, int(lens.sum()), replacement=True, generator=g)
        offsets = torch.cumsum(lens, 0) - lens
        bag = torch.repeat_interleave(torch.arange(n), lens)
        scale = lens.float().sqrt()[:, None]
        zs.append(torch.zeros(n, latent).index_add_(0, bag, lat[ids]) / scale)
        bias += torch.zeros(n).index_add_(0, bag, b[ids]) / scale.squeeze(1)
        sparse.append((ids, offsets))
    match = sum((z * u).sum(1) for z in zs) * math.sqrt(latent) / math.sqrt(T)
    pair = sum((zs[i] * zs[j]).sum(1) for i in range(T) for j in range(i)) * latent / math.sqrt(T * (T - 1) / 2)
    truth = 1.2 * match + 0.8 * pair + 0.5 * bias / math.sqrt(T) - 1.0  # the best any model can know
    labels = torch.bernoulli(torch.sigmoid(truth + 0.5 * torch.randn(n, generator=g)), generator=g)
    return {"dense": dense, "sparse": sparse, "labels": labels, "truth": truth}


def batch(data, a, b):
    """Samples [a, b) of a data set: (dense, sparse, labels) with bag offsets rebased to the slice."""
    sparse = []
    for ids, offsets in data["sparse"]:
        lo = int(offsets[a])
        hi = int(offsets[b]) if b < len(offsets) else len(ids)
        sparse.append((ids[lo:hi], offsets[a:b] - lo))
    return data["dense"][a:b], sparse, data["labels"][a:b]


def train(model, data, steps=250, batch_size=2048, lr=1e-2):
    """One pass over the batches in order (no sample seen twice, so no memorising): Adam on the MLPs,
    SparseAdam on the tables (sparse gradients: a step touches only the rows it looked up)."""
    tables = [p for n, p in model.named_parameters() if n.startswith("tables.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    opts = [torch.optim.SparseAdam(tables, lr=lr * 3), torch.optim.Adam(rest, lr=lr)]
    loss_fn, n = nn.BCEWithLogitsLoss(), len(data["labels"])
    model.train()
    for step in range(steps):
        a = step * batch_size % (n - batch_size + 1)
        dense, sparse, y = batch(data, a, a + batch_size)
        loss = loss_fn(model(dense, sparse), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    return model.eval()


def auc(scores, labels) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties given their average rank."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    order, ranks = np.argsort(scores, kind="mergesort"), np.empty(len(scores))
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    pos = labels.sum()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * (len(labels) - pos)))


def log_loss(logits, labels) -> float:
    """Mean binary cross-entropy of logits (computed stably from the logits, not clipped probabilities)."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


@torch.no_grad()
def score(model, data, batch_size=8192) -> dict:
    n = len(data["labels"])
    s = torch.cat([model(*batch(data, a, min(n, a + batch_size))[:2]) for a in range(0, n, batch_size)]).numpy()
    return {"auc": auc(s, data["labels"]), "log_loss": log_loss(s, data["labels"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "dlrm-tables-nf4.yaml"))
    ap.add_argument("--out", default=None, help="where kbit.save writes (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    args = ap.parse_args(argv)
    import kbitcli.api as kbit

    torch.manual_seed(0)
    train_set, test_set = synthetic_clicks(args.steps * 2048, seed=1), synthetic_clicks(50_000, seed=2)
    model = train(DLRM(), train_set, steps=args.steps)
    q = kbit.encode(model, recipe=args.recipe)  # a copy: `model` stays dense
    print(f"{'':8} {'test AUC':>9} {'log-loss':>9} {'MB':>7}")
    for name, m in (("dense", model), ("k-bit", q)):
        s = score(m, test_set)
        print(f"{name:8} {s['auc']:9.4f} {s['log_loss']:9.4f} {kbit.memory(m)['total_bytes'] / 1e6:7.2f}")
    print(q.tables[0])

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "dlrm-kbit")
        kbit.save(q, out, force=args.force)  # the native format, written as `kbit encode` writes it
        q2 = kbit.load(out, model=DLRM())  # any DLRM of the same shape: load replaces every tensor
    dense, sparse, _ = batch(test_set, 0, 4096)
    with torch.no_grad():
        same = torch.equal(q2(dense, sparse), q(dense, sparse))
        restored = kbit.decode(q)  # dense nn.Module again: nn.EmbeddingBag tables holding the decoded rows
        diff = (restored(dense, sparse) - q(dense, sparse)).abs().max().item()
    print(f"saved to {args.out or 'a temporary folder'}; reloaded: identical outputs {same}; "
          f"decoded to dense: max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
