"""`kbit encode / decode / inspect` as a user runs them: --json is one JSON object on stdout and nothing
else, --dry-run writes nothing and predicts the exact bytes a real encode writes, --quiet is quiet,
flags and --override reach the plan, file and folder outputs have the documented layout."""

from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open

from kbit_cli import cli, kbit, leftovers


def safetensors_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.getsize(path)


def test_json_is_one_object_on_stdout(stories_dir, tmp_path):
    """A real process, with the progress bar forced on: stdout holds exactly one JSON object."""
    dst = tmp_path / "q"
    r = kbit("encode", stories_dir, dst, "--json", env={"KBIT_PROGRESS": "1"})
    assert r.code == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.endswith("}\n")
    out = json.loads(r.stdout)
    assert isinstance(out, dict)
    assert out["quantized_tensors"] == 35 and out["tensors"] == 47 and len(out["plan"]) == 47
    assert out["bits_per_param_quantized"] == pytest.approx(4.25)
    assert out["bytes_in"] == 260032 * 4 and out["bytes_out"] == safetensors_bytes(str(dst))
    assert out["seconds"] >= 0 and "model.safetensors" in out["files"]
    assert "encode" in r.stderr  # the progress bar went to stderr
    for cmd in (["inspect", dst, "--json"], ["decode", dst, tmp_path / "d", "--json"]):
        r2 = cli(*cmd)
        assert r2.code == 0 and isinstance(json.loads(r2.stdout), dict) and r2.stdout.count("\n") == 1


def test_quiet_is_silent_and_default_prints_the_summary(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "a", "--quiet")
    assert (r.code, r.stdout, r.stderr) == (0, "", "")
    r = cli("encode", stories_dir, tmp_path / "b", "--verbose", env={"COLUMNS": "200"})
    assert r.code == 0 and r.stdout == ""
    assert "35/47 tensors quantized" in r.stderr and "model.layers.4.mlp.down_proj.weight" in r.stderr


@pytest.mark.parametrize("args", [
    [],
    ["--double-quant"],
    ["--data-type", "quantile", "--bits", "3"],
    ["--max-shard-size", "90KB", "--double-quant", "--override", "re:.*down_proj=dtype:quantile,bits:5"],
    ["--block-size", "row", "--data-type", "fp", "--bits", "6", "--scale-dtype", "bf16"],
])
@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_dry_run_writes_nothing_and_predicts_the_bytes(stories_dir, tmp_path, args, as_file):
    src = os.path.join(stories_dir, "model.safetensors") if as_file else stories_dir
    dst = str(tmp_path / ("q.safetensors" if as_file else "q"))
    dry = cli("encode", src, dst, "--dry-run", "--json", *args)
    assert dry.code == 0 and os.listdir(tmp_path) == []
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    real = cli("encode", src, dst, "--json", *args)
    assert real.code == 0, real.stderr
    done = json.loads(real.stdout)
    assert planned["bytes_out"] == done["bytes_out"] == safetensors_bytes(dst)
    assert planned["plan"] == done["plan"] and planned["shards"] == done["shards"]
    if as_file:  # a file gives one file whatever --max-shard-size says (shards would overwrite each other)
        assert done["shards"] == 1 and json.loads(cli("inspect", dst, "--json").stdout)["tensors"] == 47
    elif "--max-shard-size" in args:
        assert done["shards"] > 1 and os.path.exists(os.path.join(dst, "model.safetensors.index.json"))


def test_dry_run_verbose_prints_the_full_plan(stories_dir, tmp_path):
    r = cli("encode", stories_dir, tmp_path / "q", "--dry-run", "--verbose", env={"COLUMNS": "200"})
    assert r.code == 0 and r.stdout == "" and not os.path.exists(tmp_path / "q")
    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as f:
        for name in f.keys():
            assert name in r.stderr
    assert "dry run: nothing written" in r.stderr and "4.25" in r.stderr


def test_override_and_flags_reach_the_plan(stories_dir, tmp_path):
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "llama-nf4.yaml")
    r = cli("encode", stories_dir, tmp_path / "q", "--recipe", recipe, "--override", "re:.*down_proj.*=5",
            "--bits", "3", "--no-double-quant", "--ignore", "model.layers.4.*", "--dry-run", "--json")
    assert r.code == 0, r.stderr
    plan = {p["name"]: p for p in json.loads(r.stdout)["plan"]}
    assert plan["model.layers.0.mlp.down_proj.weight"]["bits"] == 5  # recipe base 4 -> flag 3 -> override 5
    assert plan["model.layers.0.mlp.up_proj.weight"]["bits"] == 3
    assert not plan["model.layers.0.mlp.up_proj.weight"]["double_quant"]
    assert plan["model.layers.0.mlp.down_proj.weight"]["rule"] == "override re:.*down_proj.*"
    # the --ignore flag adds to the recipe's ignore list, and ignore means dense even where an override matches
    assert not plan["model.layers.4.mlp.up_proj.weight"]["quantized"]
    assert not plan["model.layers.4.mlp.down_proj.weight"]["quantized"]
    assert plan["model.layers.4.mlp.down_proj.weight"]["rule"] == "ignore model.layers.4.*"


def test_folder_output_layout(stories_dir, tmp_path):
    dst = tmp_path / "q"
    assert cli("encode", stories_dir, dst, "--max-shard-size", "100KB", "--quiet").code == 0
    files = sorted(os.listdir(dst))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for side in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "config.json", "kbit_manifest.json",
                 "model.safetensors.index.json"):
        assert side in files
    for side in ("tokenizer.json", "tokenizer.model"):
        assert open(dst / side, "rb").read() == open(os.path.join(stories_dir, side), "rb").read()
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert qc["quant_method"] == "kbit" and qc["bits"] == 4 and qc["quantized_tensors"] == 35
    assert cfg == json.load(open(os.path.join(stories_dir, "config.json")))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.layers.0.mlp.down_proj.weight.codes" in index["weight_map"]
    manifest = json.loads((dst / "kbit_manifest.json").read_text())
    assert {o["name"] for o in manifest["outputs"]} == set(files) - {"kbit_manifest.json"}
    assert manifest["tool"] == "kbit" and manifest["format_version"] == 1 and len(manifest["tensors"]) == 47
    source = manifest["source"]["files"][0]
    assert source["name"] == "model.safetensors" and len(source["sha256"]) == 64
    assert leftovers(str(tmp_path)) == []


def test_file_output_and_sidecar_manifest(stories_dir, tmp_path):
    src = os.path.join(stories_dir, "model.safetensors")
    dst = tmp_path / "q.safetensors"
    assert cli("encode", src, dst, "--quiet").code == 0
    assert sorted(os.listdir(tmp_path)) == ["q.safetensors", "q.safetensors.manifest.json"]
    manifest = json.loads((tmp_path / "q.safetensors.manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["q.safetensors"]
    r = cli("inspect", dst, "--verify", "--json")
    assert r.code == 0 and json.loads(r.stdout)["verify"]["ok"]
    assert cli("decode", dst, tmp_path / "d.safetensors", "--quiet").code == 0
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f, safe_open(src, "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())


def test_inspect_reports_plan_and_bits(stories_dir, tmp_path):
    dense = json.loads(cli("inspect", stories_dir, "--json").stdout)
    assert dense["format"] == "dense" and dense["default_targets"] == 35 and dense["params"] == 260032
    assert cli("encode", stories_dir, tmp_path / "q", "--override", "re:.*q_proj=bits:8,dtype:int", "--quiet").code == 0
    r = json.loads(cli("inspect", tmp_path / "q", "--json").stdout)
    assert r["format"] == "kbit" and r["quantized_tensors"] == 35 and r["params"] == 260032
    rows = {p["name"]: p for p in r["plan"]}
    assert rows["model.layers.1.self_attn.q_proj.weight"]["bits"] == 8
    assert rows["model.layers.1.self_attn.q_proj.weight"]["bits_per_param"] == 8.25
    assert rows["model.layers.1.mlp.up_proj.weight"]["bits_per_param"] == 4.25
    assert r["bytes"] == safetensors_bytes(str(tmp_path / "q"))
    human = cli("inspect", tmp_path / "q", env={"COLUMNS": "200"})
    assert "model.layers.1.self_attn.q_proj.weight" in human.stderr and human.stdout == ""


def test_decode_dtype_and_config(stories_dir, tmp_path):
    assert cli("encode", stories_dir, tmp_path / "q", "--quiet").code == 0
    assert cli("decode", tmp_path / "q", tmp_path / "d", "--torch-dtype", "bf16", "--quiet").code == 0
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert not os.path.exists(tmp_path / "d" / "kbit_manifest.json")
    assert os.path.exists(tmp_path / "d" / "tokenizer.json")


def test_decode_of_a_file_is_one_file_whatever_the_shard_size(stories_dir, tmp_path):
    src = os.path.join(stories_dir, "model.safetensors")
    assert cli("encode", src, tmp_path / "q.safetensors", "--quiet").code == 0
    r = cli("decode", tmp_path / "q.safetensors", tmp_path / "d.safetensors", "--max-shard-size", "100KB", "--quiet")
    assert r.code == 0
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 47


def test_scale_refit_is_opt_in_and_recorded(stories_dir, tmp_path):
    """Plain absmax by default (bitsandbytes' scales); --scale-refit or a recipe/override key asks for the
    least-squares refit. The plan and every tensor's metadata say which."""
    q = "model.layers.0.mlp.up_proj.weight"

    def plan(*args):
        r = cli("encode", stories_dir, tmp_path / "q", "--dry-run", "--json", *args)
        assert r.code == 0, r.stderr
        return {p["name"]: p for p in json.loads(r.stdout)["plan"]}

    assert plan()[q]["scale_refit"] is False
    assert plan("--scale-refit")[q]["scale_refit"] is True
    by_override = plan("--override", "re:.*up_proj=scale_refit:true")
    assert by_override[q]["scale_refit"] is True
    assert by_override["model.layers.0.mlp.down_proj.weight"]["scale_refit"] is False
    dst = tmp_path / "out"
    assert cli("encode", stories_dir, dst, "--scale-refit", "--quiet").code == 0
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["kbit.tensors"])
    assert meta[q]["scale_refit"] is True and meta[q]["scale_search"] == 1
