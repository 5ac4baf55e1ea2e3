"""encode's plan table (issue 13): one row per tensor role by default, every tensor with --verbose, names in
natural order (layers.2 before layers.10), one row per line in a log (no name folded at 80 columns); the
whole-model bits/param of encode equal to inspect's; help texts that state the defaults and what --force replaces."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from kbit_cli import cli
from kbitcli.commands.tables import group_rows, natural_key, natural_sorted, ranges, role

# a CI log: not a terminal, and rich's default of 80 columns
LOG = {"COLUMNS": "80", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
ROLES = ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
         "self_attn.q_proj.weight", "self_attn.v_proj.weight")


def test_natural_sort_compares_numbers_as_numbers():
    names = ["model.layers.10.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight",
             "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight"]
    assert sorted(names, key=natural_key) == [
        "model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]
    assert natural_key("layers.2") < natural_key("layers.10") < natural_key("layers.10.mlp")
    assert sorted(["h.9", "h.10", "h.1a", "h.1"], key=natural_key) == ["h.1", "h.1a", "h.9", "h.10"]
    assert [r["name"] for r in natural_sorted([{"name": "a.10"}, {"name": "a.2"}])] == ["a.2", "a.10"]


def test_role_and_ranges():
    assert role("model.layers.13.mlp.down_proj.weight") == ("model.layers.*.mlp.down_proj.weight", (13,))
    assert role("model.embed_tokens.weight") == ("model.embed_tokens.weight", ())
    assert role("model.layers.3.mlp.experts.7.w1.weight") == ("model.layers.*.mlp.experts.*.w1.weight", (3, 7))
    assert ranges([4, 0, 1, 2, 3]) == "0-4"
    assert ranges([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7-8"
    assert ranges([6]) == "6"


def test_stories_groups_one_row_per_role(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "q", "--dry-run", "--json")
    assert r.code == 0, r.stderr
    groups = group_rows(json.loads(r.stdout)["plan"])
    # natural order of first appearance: embeddings, the per-layer roles (dense ones grouped too), final norm
    assert [g.name for g in groups] == (["model.embed_tokens.weight"] + [f"model.layers.*.{x}" for x in ROLES]
                                        + ["model.norm.weight"])
    for g in groups[1:-1]:
        assert (g.layers, g.count) == ("0-4", 5)
    assert (groups[0].layers, groups[0].count) == ("-", 1)
    down = groups[2]
    assert down.first["quantized"] and down.shapes == [[64, 172]] and down.bits_per_param() == pytest.approx(4.25)
    assert not groups[1].first["quantized"] and groups[1].bits_per_param() == 32


def test_an_override_on_some_layers_is_a_row_of_its_own(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "q", "--dry-run", "--json",
            "--override", r"re:model\.layers\.[01]\.self_attn\.q_proj.*=bits:8")
    assert r.code == 0, r.stderr
    q = [(g.layers, g.first["bits"]) for g in group_rows(json.loads(r.stdout)["plan"])
         if g.name == "model.layers.*.self_attn.q_proj.weight"]
    assert q == [("0-1", 8), ("2-4", 4)]  # next to each other, in layer order


def test_default_table_is_grouped(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "q", "--dry-run", env=LOG)
    assert r.code == 0 and r.stdout == ""
    lines = r.stderr.splitlines()
    for x in ROLES:
        row = next(line for line in lines if f"model.layers.*.{x}" in line)
        assert re.search(r"\s0-4\s+5\s", row), row
    assert "model.layers.3." not in r.stderr  # no per-tensor rows
    assert "47 tensors in 11 rows; --verbose lists every tensor" in r.stderr
    assert "35/47 tensors quantized" in r.stderr and "dry run: nothing written" in r.stderr


def _deep_model(tmp_path, layers: int = 12) -> tuple[str, list[str]]:
    """A bare safetensors file of `layers` layers with long names: one table row is wider than 80 columns."""
    tensors = {"transformer.word_embeddings.weight": torch.randn(64, 64)}
    for i in range(layers):
        tensors[f"transformer.encoder.layers.{i}.self_attention.query_key_value_projection.weight"] = torch.randn(64, 64)
        tensors[f"transformer.encoder.layers.{i}.post_attention_layernorm.weight"] = torch.ones(64)
    path = str(tmp_path / "deep.safetensors")
    save_file(tensors, path)
    return path, list(tensors)


def test_verbose_lists_every_tensor_in_natural_order_one_per_line(tmp_path):
    src, names = _deep_model(tmp_path)
    r = cli("encode", src, tmp_path / "q.safetensors", "--verbose", env=LOG)
    assert r.code == 0, r.stderr
    lines = r.stderr.splitlines()
    at = {}
    for n in names:  # every tensor, whole, on exactly one line: not folded at 80 columns
        hits = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(n)}\s", line)]
        assert len(hits) == 1, (n, r.stderr)
        at[n] = hits[0]
    qkv = [at[f"transformer.encoder.layers.{i}.self_attention.query_key_value_projection.weight"] for i in range(12)]
    assert qkv == sorted(qkv)  # layers.2 before layers.10
    assert at["transformer.encoder.layers.2.post_attention_layernorm.weight"] < \
        at["transformer.encoder.layers.10.post_attention_layernorm.weight"]
    table = [line for line in lines if line.startswith("transformer.")]
    assert len(table) == len(names) and all(re.search(r"\s64(x64)?\s", line) for line in table)  # one line per row: no continuation lines
    assert max(map(len, lines)) > 80  # the log got the width the rows need


def test_grouped_rows_are_not_wrapped_in_a_log(tmp_path):
    src, _ = _deep_model(tmp_path)
    r = cli("encode", src, tmp_path / "q.safetensors", env=LOG)
    assert r.code == 0, r.stderr
    table = [line for line in r.stderr.splitlines() if line.startswith("transformer.")]
    assert len(table) == 3 and all(" 64" in line for line in table)  # embeddings, qkv 0-11, layernorm 0-11
    assert any(re.match(r"transformer\.encoder\.layers\.\*\.self_attention\.query_key_value_projection\.weight\s+0-11\s+12\s",
                        line) for line in table)
    summary = [line for line in r.stderr.splitlines() if "tensors quantized" in line]
    assert len(summary) == 1 and "(whole model)" in summary[0]  # the summary is one line too


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_encode_and_inspect_agree_on_bits_per_param(stories_dir, tmp_path, as_file):
    src = os.path.join(stories_dir, "model.safetensors") if as_file else stories_dir
    dst = tmp_path / ("q.safetensors" if as_file else "q")
    dry = json.loads(cli("encode", src, dst, "--dry-run", "--json").stdout)
    r = cli("encode", src, dst, "--json")
    assert r.code == 0, r.stderr
    enc = json.loads(r.stdout)
    ins = json.loads(cli("inspect", dst, "--json").stdout)
    # the bytes of the weight files as written (safetensors header and kbit metadata included), over all params
    assert enc["bytes_out"] == ins["bytes"] and enc["params"] == ins["params"]
    assert enc["bits_per_param_model"] == ins["bits_per_param_model"]
    assert enc["bits_per_param_model"] == round(ins["bytes"] * 8 / ins["params"], 4)
    assert dry["bits_per_param_model"] == enc["bits_per_param_model"]  # --dry-run predicts the same number
    assert enc["bits_per_param_quantized"] == ins["bits_per_param_quantized"]
    # and the human summary line says the same
    human = cli("encode", src, tmp_path / ("h.safetensors" if as_file else "h"), env=LOG)
    assert f"{ins['bits_per_param_model']} (whole model)" in human.stderr


def test_bnb_encode_and_inspect_agree_on_bits_per_param(stories_dir, tmp_path):
    enc = json.loads(cli("encode", stories_dir, tmp_path / "b", "--format", "bnb", "--json").stdout)
    ins = json.loads(cli("inspect", tmp_path / "b", "--json").stdout)
    assert enc["bits_per_param_model"] == ins["bits_per_param_model"] and enc["bytes_out"] == ins["bytes"]


def _help(*cmd: str) -> str:
    r = cli(*cmd, "--help", env={"COLUMNS": "250"})
    assert r.code == 0
    return " ".join(r.stdout.split())


def test_help_states_the_defaults():
    from kbitcli.finetune import TrainConfig
    from kbitcli.recipes import Recipe

    d, h = Recipe(), _help("encode")
    for text in (f"bits per weight, 2..8 (default: {d.bits})", f"(default: {d.block_size})",
                 f"default: {d.dtype})", f"default: {d.scale_dtype})", f"(default: {d.method})",
                 "8-bit scales, bnb style (default: off)", "Without --recipe: k=4, block 64, nf codebook",
                 "gguf: block_size 32, dtype int", "--verbose"):
        assert text in h, text
    t, h = TrainConfig(), _help("finetune")
    for text in (f"LoRA rank r (default: {t.rank})", f"(default: {t.steps})", f"(default: {t.lr:g})",
                 f"(default: {t.context})", "Replace OUT if it exists"):
        assert text in h, text


def test_bench_force_names_what_it_replaces():
    for cmd, says in (("error", "replace the output folder"), ("speed", "replace the output folder"),
                      ("scaling", "start the study over")):
        h = _help("bench", cmd)
        assert "DST" not in h and re.search(rf"--force\s+\S*\s*--out: {says}", h), (cmd, h)
