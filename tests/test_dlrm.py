"""A recommendation model from Python: the DLRM of examples/dlrm.py, trained here on synthetic clicks (a hidden
world of id latents, Zipf popularity), encoded with `kbit.encode` so its tables become KbitEmbeddingBags, and
scored on held-out clicks; the k-bit tables hold only codes, scales and codebook; save/load round-trips."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import kbitcli.api as kbit
from kbitcli.core.codebooks import fixed_codebook

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from dlrm import DLRM, batch, score, synthetic_clicks, train  # noqa: E402

SIZES = (4096, 4096, 2048, 2048)  # 12,288 rows x 32: 1.5 MB of fp32 tables, trained in about a second
TABLES = r"re:tables\.\d+"


def tables_at(bits: int, dtype: str = "int") -> dict:
    return {"bits": bits, "block_size": 64, "dtype": dtype, "targets": [TABLES]}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = train(DLRM(table_sizes=SIZES), synthetic_clicks(100 * 512, seed=1, table_sizes=SIZES), steps=100,
                  batch_size=512)
    return model, synthetic_clicks(20_000, seed=2, table_sizes=SIZES)  # test clicks: another draw


@pytest.fixture(scope="module")
def int8(trained):
    return kbit.encode(trained[0], recipe=tables_at(8))


def test_dense_model_learns_the_clicks(trained):
    model, test = trained
    s = score(model, test)
    assert s["auc"] > 0.7, s  # chance is 0.5: the model found the hidden structure
    base = test["labels"].mean().item()  # the log-loss of always predicting the click rate
    assert s["log_loss"] < -(base * math.log(base) + (1 - base) * math.log(1 - base)) - 0.05, s


def test_k8_tables_keep_auc_and_k2_costs_log_loss(trained, int8):
    model, test = trained
    dense, s8 = score(model, test), score(int8, test)
    s2 = score(kbit.encode(model, recipe=tables_at(2)), test)
    assert abs(s8["auc"] - dense["auc"]) < 0.01, (dense, s8)
    assert s2["log_loss"] > s8["log_loss"], (s2, s8)
    assert all(isinstance(t, kbit.KbitEmbeddingBag) for t in int8.tables)
    assert all(isinstance(t, torch.nn.EmbeddingBag) for t in model.tables)  # encode made a copy


def test_k8_tables_hold_no_fp32_copy(trained, int8):
    """Resident bytes, exactly: per table one code byte per value, an fp16 scale per block of 64 and the
    255-entry int8 codebook (fp32); everything else (the MLPs) as dense as before."""
    model, _ = trained
    dense_mem, q_mem = kbit.memory(model), kbit.memory(int8)
    table_fp32 = sum(t.weight.numel() * 4 for t in model.tables)
    codebook = fixed_codebook("int", 8).numel() * 4
    expected = sum(n * 32 + math.ceil(n * 32 / 64) * 2 + codebook for n in SIZES)
    assert q_mem["kbit_module_bytes"] == expected
    assert q_mem["total_bytes"] == dense_mem["total_bytes"] - table_fp32 + expected
    assert table_fp32 / expected > 3.8  # 32 bits against 8.25 and a codebook
    for t in int8.tables:
        assert not any(b.dtype == torch.float32 and b.numel() >= t.num_embeddings for b in t.buffers())


def test_save_load_round_trip_gives_identical_outputs(trained, int8, tmp_path):
    _, test = trained
    kbit.save(int8, str(tmp_path / "dlrm"))
    loaded = kbit.load(str(tmp_path / "dlrm"), model=DLRM(table_sizes=SIZES))
    dense, sparse, _ = batch(test, 0, 2048)
    with torch.no_grad():
        assert torch.equal(loaded(dense, sparse), int8(dense, sparse))
        decoded = kbit.decode(loaded)  # dense again: the decoded rows in plain nn.EmbeddingBags
        assert type(decoded.tables[0]) is torch.nn.EmbeddingBag
        torch.testing.assert_close(decoded(dense, sparse), int8(dense, sparse), rtol=1e-5, atol=1e-5)


def test_embedding_tables_become_kbit_embeddings(trained):
    """The same model with nn.Embedding tables (bags summed by the model): KbitEmbedding, same logits as
    the k-bit EmbeddingBag model up to summation order."""
    model, test = trained
    plain = DLRM(table_sizes=SIZES, bags=False)
    plain.load_state_dict(model.state_dict())
    q_plain, q_bags = kbit.encode(plain, recipe=tables_at(4, "nf")), kbit.encode(model, recipe=tables_at(4, "nf"))
    assert all(type(t) is kbit.KbitEmbedding for t in q_plain.tables)
    dense, sparse, _ = batch(test, 0, 2048)
    with torch.no_grad():
        torch.testing.assert_close(q_plain(dense, sparse), q_bags(dense, sparse), rtol=1e-4, atol=1e-4)


def test_family_recipe_targets_the_tables_only(trained):
    """recipes/dlrm-tables-nf4.yaml, the family default: every table k-bit, every MLP layer dense, AUC kept."""
    model, test = trained
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "dlrm-tables-nf4.yaml")
    q = kbit.encode(model, recipe=recipe)
    assert all(isinstance(t, kbit.KbitEmbeddingBag) and t.spec.bits == 4 for t in q.tables)
    assert all(type(m) is torch.nn.Linear for m in [*q.bottom, *q.top] if not isinstance(m, torch.nn.ReLU))
    assert abs(score(q, test)["auc"] - score(model, test)["auc"]) < 0.005
