"""Recipes: YAML keys, pattern matching, override order, flags over recipe, CLI --override parsing, errors
before any work, and every shipped encode recipe on the model it is meant for."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.recipes import RECIPE_KEYS, Override, Recipe, from_dict, load_recipe, matches, parse_override, with_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")


def plan(src: str, recipe: Recipe) -> dict:
    """The dry-run plan: name -> row."""
    return {p["name"]: p for p in encode(src, "/nonexistent/never-written", recipe, dry_run=True)["plan"]}


def bad(data, match: str):
    with pytest.raises(KbitError, match=match) as e:
        from_dict(data, "r.yaml")
    assert e.value.exit_code == 2 and "r.yaml" in str(e.value) and "\n" not in str(e.value)


# --- keys and values ---------------------------------------------------------------------------------


def test_defaults():
    r = from_dict({}, "r.yaml")
    assert (r.bits, r.block_size, r.dtype, r.double_quant) == (4, 64, "nf", False)
    assert (r.targets, r.ignore, r.overrides) == (None, [], [])


def test_unknown_keys_are_refused():
    bad({"bits": 4, "blocksize": 64}, "unknown key.*blocksize")
    bad({"overrides": [{"pattern": "x", "bit": 5}]}, r"overrides\[0\].*unknown key.*bit")
    bad([1, 2], "YAML mapping")


@pytest.mark.parametrize("bits", [1, 9, 0, "4", 4.5, True])
def test_bits_outside_2_to_8(bits):
    bad({"bits": bits}, "bits must be an integer from 2 to 8")


@pytest.mark.parametrize("block", [48, 100, 8, 8192, 0, -64, "rows", 64.5, "sixty-four"])
def test_block_size_not_a_power_of_two_or_out_of_range(block):
    bad({"block_size": block}, "block_size")


@pytest.mark.parametrize("block, expect", [(16, 16), (4096, 4096), (128, 128), ("row", "row"), ("Tensor", "tensor"),
                                           (64.0, 64)])
def test_block_size_accepted(block, expect):
    assert from_dict({"block_size": block}, "r.yaml").block_size == expect


def test_other_values():
    bad({"dtype": "nf4"}, "dtype 'nf4'")
    bad({"double_quant": "yes"}, "double_quant")
    bad({"scale_dtype": "fp8"}, "scale_dtype")
    bad({"targets": [3]}, "targets must be a list of patterns")
    bad({"targets": ["re:(unclosed"]}, "bad regular expression")
    bad({"overrides": {"pattern": "x"}}, "overrides must be a list")
    bad({"overrides": [{"bits": 5}]}, "needs a 'pattern'")
    bad({"overrides": [{"pattern": "x"}]}, "says nothing to change")
    bad({"overrides": [{"pattern": "x", "bits": 9}]}, r"overrides\[0\].*bits")
    bad({"overrides": [{"pattern": "x", "skip": "yes"}]}, "skip must be true or false")


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(KbitError, match="recipe not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("bits: [4\n")
    with pytest.raises(KbitError, match="not valid YAML"):
        load_recipe(str(broken))


# --- patterns ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, name, hit", [
    ("model.layers.*.mlp.*", "model.layers.3.mlp.down_proj.weight", True),
    ("model.layers.0.*", "model.layers.0.self_attn.q_proj.weight", True),
    ("*.down_proj", "model.layers.3.mlp.down_proj.weight", True),  # module name: the name without .weight
    ("down_proj", "model.layers.3.mlp.down_proj.weight", False),  # globs match the whole name, not a part
    ("re:.*down_proj", "model.layers.3.mlp.down_proj.weight", True),
    ("re:down_proj", "model.layers.3.mlp.down_proj.weight", False),  # regexes too: fullmatch
    ("re:.*(q|k|v|o|gate|up|down)_proj", "model.layers.1.self_attn.o_proj.weight", True),
    ("re:.*(q|k|v|o|gate|up|down)_proj", "model.layers.1.input_layernorm.weight", False),
    ("re:.*\\.weight", "model.norm.weight", True),
    ("model.layers.[0-1].*", "model.layers.2.mlp.up_proj.weight", False),
])
def test_matches(pattern, name, hit):
    assert matches(pattern, name) is hit


def test_default_targets_on_stories(stories_dir):
    p = plan(stories_dir, Recipe())
    q = [n for n, r in p.items() if r["quantized"]]
    assert len(q) == 35 and all(n.endswith("_proj.weight") for n in q)
    assert not p["model.embed_tokens.weight"]["quantized"] and not p["model.norm.weight"]["quantized"]
    assert p["model.embed_tokens.weight"]["rule"] == "not a target"


def test_default_targets_on_minilm(minilm_dir):
    p = plan(minilm_dir, Recipe())
    q = sorted(n for n, r in p.items() if r["quantized"])
    assert len(q) == 37 and "pooler.dense.weight" in q
    assert all(".dense.weight" in n or n.endswith(("query.weight", "key.weight", "value.weight")) for n in q)
    assert not any("embeddings" in n or "LayerNorm" in n or n.endswith(".bias") for n in q)


def test_targets_never_quantize_1d_tensors(stories_dir):
    p = plan(stories_dir, Recipe(targets=["re:model\\.layers\\.0\\..*"]))
    q = {n for n, r in p.items() if r["quantized"]}
    assert len(q) == 7 and "model.layers.0.input_layernorm.weight" not in q
    with pytest.raises(KbitError, match="matches no quantizable"):
        plan(stories_dir, Recipe(targets=["re:.*norm.*"]))  # only 1-D norms match


def test_ignore(stories_dir):
    p = plan(stories_dir, Recipe(ignore=["model.layers.4.*"]))
    assert sum(r["quantized"] for r in p.values()) == 28
    assert p["model.layers.4.mlp.up_proj.weight"]["rule"] == "ignore model.layers.4.*"


# --- overrides: order, keys, skip --------------------------------------------------------------------


def test_overrides_apply_in_order_key_by_key(stories_dir):
    r = from_dict({"bits": 4, "overrides": [
        {"pattern": "re:.*down_proj", "bits": 5, "dtype": "fp"},
        {"pattern": "model.layers.0.*", "bits": 6},  # later: wins on bits, keeps the fp of the first
        {"pattern": "model.layers.1.mlp.down_proj", "skip": True},
    ]}, "r.yaml")
    p = plan(stories_dir, r)

    def got(layer: int, proj: str):
        row = p[f"model.layers.{layer}.mlp.{proj}.weight"]
        return row["bits"], row["data_type"]

    assert got(3, "down_proj") == (5, "fp")
    assert got(0, "down_proj") == (6, "fp")
    assert got(0, "up_proj") == (6, "nf")
    assert got(2, "up_proj") == (4, "nf")
    assert not p["model.layers.1.mlp.down_proj.weight"]["quantized"]
    assert p["model.layers.0.mlp.up_proj.weight"]["rule"] == "override model.layers.0.*"


def test_override_can_target_a_non_default_tensor(stories_dir):
    p = plan(stories_dir, Recipe(overrides=[Override("model.embed_tokens", {"bits": 8, "dtype": "int"})]))
    assert p["model.embed_tokens.weight"]["quantized"] and p["model.embed_tokens.weight"]["bits"] == 8


def test_flags_override_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"bits": 4, "block_size": 64, "dtype": "nf", "double_quant": True,
                                    "targets": ["re:.*mlp.*"], "ignore": ["re:.*up_proj"],
                                    "overrides": [{"pattern": "re:.*down_proj", "bits": 5}]}))
    base = load_recipe(str(path))
    r = with_flags(base, bits=3, block_size="128", dtype="fp", double_quant=False, targets=["re:.*proj"],
                   ignore=["re:.*gate_proj"], overrides=["re:.*down_proj=6"])
    assert (r.bits, r.block_size, r.dtype, r.double_quant) == (3, 128, "fp", False)
    assert r.targets == ["re:.*proj"]  # replaced
    assert r.ignore == ["re:.*up_proj", "re:.*gate_proj"]  # appended
    assert [o.settings for o in r.overrides] == [{"bits": 5}, {"bits": 6}]  # flag overrides come last: they win
    assert with_flags(base).bits == 4 and base.bits == 4  # no flags: the recipe as is, and it is not mutated
    with pytest.raises(KbitError, match="flags: block_size 100"):
        with_flags(base, block_size="100")


@pytest.mark.parametrize("text, pattern, settings", [
    ("re:.*down_proj.*=5", "re:.*down_proj.*", {"bits": 5}),
    ("model.layers.0.*=skip", "model.layers.0.*", {"skip": True}),
    ("re:.*=bits:5,dtype:fp,block_size:128", "re:.*", {"bits": 5, "dtype": "fp", "block_size": 128}),
    ("re:.*(?=down)down_proj=3", "re:.*(?=down)down_proj", {"bits": 3}),  # '=' inside the pattern
    ("x=double_quant:true,scale_dtype:bf16", "x", {"double_quant": True, "scale_dtype": "bf16"}),
    ("x=block_size:row", "x", {"block_size": "row"}),
])
def test_parse_override(text, pattern, settings):
    o = parse_override(text)
    assert (o.pattern, o.settings) == (pattern, settings)


@pytest.mark.parametrize("text, match", [
    ("down_proj", "expected PATTERN=BITS"), ("=5", "expected PATTERN=BITS"), ("x=", "expected PATTERN=BITS"),
    ("x=9", "bits must be"), ("x=1", "bits must be"), ("x=bits:", "is not key:value"), ("x=foo:1", "is not key:value"),
    ("x=block_size:48", "power of two"), ("re:(=5", "bad regular expression"), ("x=dtype:nf4", "dtype 'nf4'"),
])
def test_parse_override_errors(text, match):
    with pytest.raises(KbitError, match=match) as e:
        parse_override(text)
    assert e.value.exit_code == 2 and "--override" in str(e.value)


# --- errors at plan time, before any work --------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_source(tmp_path_factory, stories_dir) -> str:
    """stories260K with a NaN in the *first* tensor encode would quantize: if a plan error came after any
    quantization started, the NaN would be reported instead."""
    sd = load_file(os.path.join(stories_dir, "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    path = str(tmp_path_factory.mktemp("nan") / "nan.safetensors")
    save_file(sd, path)
    return path


@pytest.mark.parametrize("recipe, match", [
    (Recipe(targets=["re:.*dwon_proj"]), "targets pattern 're:.*dwon_proj' matches no"),
    (Recipe(ignore=["model.layers.9.*"]), "ignore pattern 'model.layers.9.\\*' matches no tensor"),
    (Recipe(overrides=[Override("re:.*attn.q", {"bits": 5})]), "overrides pattern 're:.*attn.q' matches no"),
    (Recipe(block_size=4096), "block_size 4096 does not fit tensor 'model.layers.0.self_attn.k_proj.weight'"),
    (Recipe(overrides=[Override("re:.*k_proj", {"block_size": 4096})]), "does not fit tensor"),
])
def test_plan_errors_come_before_any_work(nan_source, tmp_path, recipe, match):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(KbitError, match=match) as e:
        encode(nan_source, str(dst), recipe)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left
    # the same source with a valid recipe does reach the data, and names the bad tensor
    with pytest.raises(KbitError, match="'model.layers.0.mlp.down_proj.weight' holds NaN"):
        encode(nan_source, str(dst), Recipe())
    assert os.listdir(tmp_path) == []


def test_block_bigger_than_a_tensor_can_be_fixed_per_tensor(stories_dir):
    r = Recipe(block_size=4096, overrides=[Override("re:.*(k|v)_proj", {"block_size": "tensor"}),
                                           Override("re:.*(q|o)_proj", {"block_size": "row"})])
    p = plan(stories_dir, r)
    assert p["model.layers.0.self_attn.k_proj.weight"]["block_values"] == 2048
    assert p["model.layers.0.self_attn.q_proj.weight"]["block_values"] == 64
    assert p["model.layers.0.mlp.up_proj.weight"]["block_values"] == 4096


# --- shipped recipes ---------------------------------------------------------------------------------

# every encode recipe in recipes/ and the model it is meant for
SHIPPED = {"llama-nf4.yaml": "stories", "aggressive-3bit.yaml": "stories", "int8.yaml": "stories",
           "llama-nf4-emb8.yaml": "stories", "bert-nf4.yaml": "minilm",
           "cnn-nf4.yaml": "mobilenet_v2 (tests/test_vision.py)", "dlrm-tables-nf4.yaml": "dlrm (tests/test_dlrm.py)"}


def test_every_encode_recipe_is_listed_here():
    encode_recipes = set()
    for path in glob.glob(os.path.join(RECIPES, "*.yaml")):
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if set(data) <= RECIPE_KEYS:  # other YAML files (finetune, bench studies) have other keys
            encode_recipes.add(os.path.basename(path))
    assert encode_recipes == set(SHIPPED)


@pytest.mark.parametrize("name", [n for n, m in SHIPPED.items() if m == "stories"])
def test_llama_recipes_encode_stories(name, stories_dir, tmp_path):
    from kbitcli.decode import decode
    from kbitcli.formats.kbit_format import KbitCheckpoint

    r = load_recipe(os.path.join(RECIPES, name))
    out = encode(stories_dir, str(tmp_path / "q"), r)
    assert out["quantized_tensors"] == (36 if name == "llama-nf4-emb8.yaml" else 35)  # + the embedding
    ck = KbitCheckpoint(str(tmp_path / "q"))
    bits = {ck.meta[n]["bits"] for n in ck.names if ck.is_quantized(n)}
    expect = {"llama-nf4.yaml": ({4}, 4.13), "aggressive-3bit.yaml": ({3, 4}, 3.6), "int8.yaml": ({8}, 8.25),
              "llama-nf4-emb8.yaml": ({4, 8}, 4.64)}[name]
    assert bits == expect[0] and out["bits_per_param_quantized"] == pytest.approx(expect[1], abs=0.01)
    decode(str(tmp_path / "q"), str(tmp_path / "d"))
    sd, orig = load_file(str(tmp_path / "d" / "model.safetensors")), load_file(os.path.join(stories_dir, "model.safetensors"))
    assert sd.keys() == orig.keys()
    w, q = orig["model.layers.2.mlp.up_proj.weight"], sd["model.layers.2.mlp.up_proj.weight"]
    cos = torch.nn.functional.cosine_similarity(w.reshape(-1), q.reshape(-1), dim=0)
    floor = {"int8.yaml": 0.9999, "llama-nf4.yaml": 0.99, "aggressive-3bit.yaml": 0.97, "llama-nf4-emb8.yaml": 0.99}
    assert cos > floor[name]
    if name == "llama-nf4-emb8.yaml":  # the 8-bit embedding decodes close to the original table
        e, qe = orig["model.embed_tokens.weight"], sd["model.embed_tokens.weight"]
        assert not torch.equal(e, qe)
        assert torch.nn.functional.cosine_similarity(e.reshape(-1), qe.reshape(-1), dim=0) > 0.9999


def test_aggressive_3bit_keeps_the_sensitive_layers_at_4_bits(stories_dir):
    p = plan(stories_dir, load_recipe(os.path.join(RECIPES, "aggressive-3bit.yaml")))
    for n, r in p.items():
        if r["quantized"]:
            assert r["bits"] == (4 if any(s in n for s in ("k_proj", "v_proj", "down_proj")) else 3), n
            assert r["block_values"] == 32 and r["double_quant"]


def test_bert_recipe_plans_minilm(minilm_dir):
    """bert-nf4 quantizes exactly MiniLM's 37 linear weights (the real encode runs in test_roundtrip_real)."""
    p = plan(minilm_dir, load_recipe(os.path.join(RECIPES, "bert-nf4.yaml")))
    default = plan(minilm_dir, Recipe())
    assert {n for n, r in p.items() if r["quantized"]} == {n for n, r in default.items() if r["quantized"]}
    assert all(r["bits"] == 4 and r["data_type"] == "nf" and r["double_quant"] for r in p.values() if r["quantized"])


def test_bert_recipe_accepts_task_model_names(tmp_path, minilm_dir):
    """`bert.encoder.layer.N...` names (BertForSequenceClassification's) match too: MiniLM's tensors renamed."""
    sd = load_file(os.path.join(minilm_dir, "model.safetensors"))
    renamed = {f"bert.{n}": t for n, t in sd.items()}
    renamed["classifier.weight"] = sd["pooler.dense.weight"][:2].clone()  # a task head: not an encoder layer
    save_file(renamed, str(tmp_path / "task.safetensors"))
    p = plan(str(tmp_path / "task.safetensors"), load_recipe(os.path.join(RECIPES, "bert-nf4.yaml")))
    q = {n for n, r in p.items() if r["quantized"]}
    assert len(q) == 37 and "bert.pooler.dense.weight" in q and "classifier.weight" not in q


def test_ignore_wins_over_a_broad_override(stories_dir):
    p = plan(stories_dir, Recipe(ignore=["model.layers.0.*"], overrides=[Override("re:.*proj", {"bits": 5})]))
    assert not p["model.layers.0.mlp.up_proj.weight"]["quantized"]
    assert p["model.layers.0.mlp.up_proj.weight"]["rule"] == "ignore model.layers.0.*"
    assert p["model.layers.1.mlp.up_proj.weight"]["bits"] == 5
