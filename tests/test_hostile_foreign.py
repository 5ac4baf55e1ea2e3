"""Damaged foreign checkpoints (the trust issue): a bitsandbytes folder with an edited quant_state or a truncated
part, a compressed-tensors folder with an unsupported num_bits or parts that disagree with weight_shape, a GGUF
file without the llama.* metadata kbit rebuilds config.json from. None may decode to garbage with exit 0: each is
exit 1 (damaged, naming the tensor and `kbit inspect PATH --verify`) or exit 2 (bad input, naming the key), one
line on stderr, no traceback, and no output left behind. The undamaged exports still decode.

Everything is stories260K written by kbit itself (in-process CLI), then edited the way a person or a broken copy
would: safetensors re-saved with a consistent header, config.json rewritten, GGUF re-written by the `gguf` package.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kbit_cli import assert_bad_input, cli

Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]: blocks of 64, one group of 64 per row
STATE = f"{Q}.quant_state.bitsandbytes__nf4"
CT_Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def exports(stories_dir, tmp_path_factory) -> dict[str, str]:
    """stories260K as bnb nf4 (fp32 absmax), bnb nf4 + double quant, compressed-tensors int4 and GGUF Q4_0."""
    root = tmp_path_factory.mktemp("foreign")
    runs = {"bnb": ["--format", "bnb"], "bnb-dq": ["--format", "bnb", "--double-quant"],
            "ct": ["--format", "compressed-tensors", "--override", "model.layers.*.mlp.down_proj=block_size:row"],
            "s.gguf": ["--format", "gguf", "--override", "model.layers.*.mlp.down_proj=skip"]}
    out = {}
    for name, flags in runs.items():
        r = cli("encode", stories_dir, root / name, *flags, "--quiet")
        assert r.code == 0, r.stderr
        out[name] = str(root / name)
    return out


def copy_of(src: str, tmp_path) -> str:
    dst = str(tmp_path / os.path.basename(src))
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return dst


def rewrite(folder: str, edit) -> None:
    """Re-save model.safetensors after edit(tensors) changed the dict: the header stays consistent, so only kbit's
    own checks can tell."""
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def edit_state(**changes):
    """An edit of Q's quant_state JSON (bytes that are not JSON when changes has `raw`)."""
    def edit(t):
        st = json.loads(bytes(t[STATE].numpy()))
        st.update(changes)
        raw = changes["raw"] if "raw" in changes else json.dumps(st).encode()
        t[STATE] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return edit


def set_item(key: str, index, value):
    def edit(t):
        t[key] = t[key].clone()
        t[key][index] = value
    return edit


def replace(key: str, fn):
    def edit(t):
        t[key] = fn(t[key]).contiguous()
    return edit


def assert_refused(path: str, tmp_path, *mentions: str, code: int, inspect: bool = True) -> None:
    """decode (and, for damage the headers show, inspect) fail: one line naming `mentions`, no output left."""
    out = str(tmp_path / "out")
    assert_bad_input(cli("decode", path, out, "--quiet"), *mentions, dst=out, code=code)
    if inspect:
        assert_bad_input(cli("inspect", path), *mentions, code=code)


def assert_damaged(path: str, tmp_path, tensor: str, *mentions: str, inspect: bool = True) -> None:
    assert_refused(path, tmp_path, f"tensor {tensor!r} is damaged", "--verify", *mentions, code=1, inspect=inspect)


@pytest.mark.parametrize("name", ["bnb", "bnb-dq", "ct", "s.gguf"])
def test_undamaged_exports_decode(exports, tmp_path, name):
    assert cli("decode", exports[name], tmp_path / "out", "--quiet").code == 0
    assert cli("inspect", exports[name]).code == 0


# --- bitsandbytes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (edit_state(shape=[64, 32]), ["holds 2048 values", "[64, 32]", "imply 1024"]),  # a smaller weight
    (edit_state(shape=[128, 64]), ["[128, 64]", "imply 4096"]),  # a larger one
    (edit_state(shape=[64, 0]), ["bad shape"]),
    (edit_state(shape="64x64"), ["bad shape"]),
    (edit_state(blocksize=128), ["absmax holds 64 values", "blocksize 128 imply 32"]),
    (edit_state(blocksize=32), ["blocksize 32 imply 128"]),
    (edit_state(blocksize=48), ["bad blocksize"]),  # not a power of two
    (edit_state(blocksize=0), ["bad blocksize"]),
    (edit_state(blocksize=-64), ["bad blocksize"]),
    (edit_state(blocksize="64"), ["bad blocksize"]),
    (edit_state(quant_type="nf5"), ["bad quant_type"]),
    (edit_state(quant_type="fp4"), ["bad quant_type"]),  # the key says nf4
    (edit_state(dtype="float8"), ["bad dtype"]),
    (edit_state(raw=b"{not json"), ["not JSON"]),
    (edit_state(raw=b"[1, 2]"), ["not a JSON object"]),
    (replace(f"{Q}.absmax", lambda a: a[:-1]), ["absmax holds 63 values"]),
    (replace(Q, lambda w: w[:-1]), ["holds 2047 values", "imply 2048"]),  # the packed codes, ceil(n / 2) bytes
    (replace(f"{Q}.quant_map", lambda m: m[:8]), ["quant_map holds 8 values"]),
    (replace(f"{Q}.absmax", lambda a: (a * 100).to(torch.uint8)), ["absmax is uint8"]),  # dq codes without dq
    (lambda t: t.pop(f"{Q}.absmax"), ["absmax' is missing"]),
])
def test_bnb_damage_is_seen_when_opened(exports, tmp_path, edit, words):
    path = copy_of(exports["bnb"], tmp_path)
    rewrite(path, edit)
    assert_damaged(path, tmp_path, Q, *words)


@pytest.mark.parametrize("edit, words", [
    (edit_state(nested_offset=float("nan")), ["bad nested_offset"]),
    (edit_state(nested_blocksize=0), ["bad nested_blocksize"]),
    (edit_state(nested_blocksize=32), ["nested_absmax holds 1 values", "imply 2"]),
    (edit_state(blocksize=32), ["absmax holds 64 values"]),
    (replace(f"{Q}.nested_quant_map", lambda m: m[:255]), ["nested_quant_map holds 255 values"]),
    (replace(f"{Q}.absmax", lambda a: a.float()), ["absmax is float32"]),  # fp32 absmax beside a nested one
])
def test_bnb_double_quant_damage_is_seen_when_opened(exports, tmp_path, edit, words):
    path = copy_of(exports["bnb-dq"], tmp_path)
    rewrite(path, edit)
    assert_damaged(path, tmp_path, Q, *words)


@pytest.mark.parametrize("export, key, value", [
    ("bnb", f"{Q}.absmax", float("nan")), ("bnb", f"{Q}.absmax", float("inf")),
    ("bnb", f"{Q}.quant_map", float("nan")), ("bnb-dq", f"{Q}.nested_absmax", float("nan")),
    ("bnb-dq", f"{Q}.nested_quant_map", float("-inf")),
])
def test_bnb_non_finite_tables_fail_the_decode(exports, tmp_path, export, key, value):
    """NaN / Inf is in the data, not the headers: inspect (which reads none) passes, decode reads and refuses it."""
    path = copy_of(exports[export], tmp_path)
    rewrite(path, set_item(key, 0, value))
    assert_damaged(path, tmp_path, Q, f"NaN or Inf in its {key.rsplit('.', 1)[1]}", inspect=False)


@pytest.mark.parametrize("scb, words, inspect", [
    (torch.full((4,), 127.0), None, True),  # undamaged: weight int8 rows times SCB / 127
    (torch.ones(3), ["lin.SCB does not hold one value per row"], True),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), ["NaN or Inf in its SCB"], False),
])
def test_bnb_int8_rows_and_their_absmax(tmp_path, scb, words, inspect):
    """LLM.int8 (`SCB` beside an int8 weight), which kbit reads but does not write: a hand-made file."""
    path = str(tmp_path / "int8.safetensors")
    save_file({"lin.weight": torch.arange(-16, 16, dtype=torch.int8).reshape(4, 8), "lin.SCB": scb}, path)
    if words is None:
        assert cli("decode", path, tmp_path / "out.safetensors", "--quiet").code == 0
        assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["lin.weight"].float(),
                           torch.arange(-16, 16).reshape(4, 8).float())
    else:
        assert_damaged(path, tmp_path, "lin.weight", *words, inspect=inspect)


# --- compressed-tensors ---------------------------------------------------------------------------------------

def edit_config(path: str, group: str, **weights) -> None:
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"]["config_groups"][group]["weights"].update(weights)
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)


@pytest.mark.parametrize("weights, words", [
    ({"num_bits": 9}, ["num_bits is 9", "2 to 8 bits"]),
    ({"num_bits": 0}, ["num_bits is 0"]),
    ({"num_bits": 1}, ["num_bits is 1"]),
    ({"num_bits": "4"}, ["num_bits is '4'"]),
    ({"num_bits": 4.0}, ["num_bits is 4.0"]),
    ({"num_bits": True}, ["num_bits is True"]),
    ({"group_size": 0}, ["group_size is 0"]),
    ({"strategy": "token"}, ["strategy is 'token'"]),
])
def test_ct_unsupported_scheme_is_bad_input(exports, tmp_path, weights, words):
    path = copy_of(exports["ct"], tmp_path)
    edit_config(path, "group_1", **weights)
    assert_refused(path, tmp_path, "config.json", "config_groups.group_1.weights", *words, code=2)


@pytest.mark.parametrize("edit, key, words", [
    (replace(f"{CT_Q}.weight_packed", lambda p: p[:, :-1]), "weight_packed", ["[64, 7]", "int32 [64, 8]"]),
    (replace(f"{CT_Q}.weight_packed", lambda p: p[:-1]), "weight_packed", ["[63, 8]"]),
    (replace(f"{CT_Q}.weight_packed", lambda p: p.view(torch.float32)), "weight_packed", ["is float32 [64, 8]"]),
    (replace(f"{CT_Q}.weight_shape", lambda s: s * 2), "weight_packed", ["weight_shape [128, 128]"]),
    (replace(f"{CT_Q}.weight_shape", lambda s: -s), "weight_shape", ["[-64, -64]"]),
    (replace(f"{CT_Q}.weight_shape", lambda s: torch.cat([s, s[:1]])), "weight_shape", ["[64, 64, 64]"]),
    (replace(f"{CT_Q}.weight_shape", lambda s: s.float()), "weight_shape", ["not [rows, columns]"]),
    (replace(f"{CT_Q}.weight_scale", lambda s: torch.cat([s, s], dim=1)), "weight_scale", ["[64, 2]", "64 scales"]),
    (replace(f"{CT_Q}.weight_scale", lambda s: s[:32]), "weight_scale", ["[32, 1]"]),
    (lambda t: t.pop(f"{CT_Q}.weight_scale"), "weight_scale", ["is missing"]),
    (lambda t: t.pop(f"{CT_Q}.weight_shape"), "weight_shape", ["is missing"]),
])
def test_ct_parts_that_disagree_are_damaged(exports, tmp_path, edit, key, words):
    path = copy_of(exports["ct"], tmp_path)
    rewrite(path, edit)
    assert_damaged(path, tmp_path, f"{CT_Q}.weight", key, *words)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_ct_non_finite_scales_fail_the_decode(exports, tmp_path, value):
    path = copy_of(exports["ct"], tmp_path)
    rewrite(path, set_item(f"{CT_Q}.weight_scale", (5, 0), value))
    assert_damaged(path, tmp_path, f"{CT_Q}.weight", "NaN or Inf in its weight_scale", inspect=False)


# --- GGUF -----------------------------------------------------------------------------------------------------

def gguf_copy(src: str, dst: str, drop: tuple = (), set_: dict | None = None, edit=None) -> str:
    """src re-written by the gguf package without the keys in drop, with set_ values replacing others, and each
    tensor's data through edit(name, array) when given."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(src)
    arch = "general.architecture"
    w = gguf.GGUFWriter(dst, (set_ or {}).get(arch, r.fields[arch].contents()))  # the writer adds this key itself
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop or key == arch:
            continue
        value = (set_ or {}).get(key, f.contents())
        w.add_key_value(key, value, f.types[0], f.types[-1] if len(f.types) > 1 else None)
    if arch in drop:
        w.kv_data[0].pop(arch)
    for t in r.tensors:
        data = np.array(t.data)
        if edit is not None:
            data = edit(t.name, data)
        quantized = t.tensor_type.name not in ("F32", "F16")
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type if quantized else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_copy_is_faithful(exports, tmp_path):
    """The re-writer itself changes nothing, so every refusal below is the edit's."""
    path = gguf_copy(exports["s.gguf"], str(tmp_path / "same.gguf"))
    assert cli("decode", path, tmp_path / "out", "--quiet").code == 0


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                                 "llama.feed_forward_length", "general.architecture"])
def test_gguf_without_required_metadata_is_bad_input(exports, tmp_path, key):
    path = gguf_copy(exports["s.gguf"], str(tmp_path / "x.gguf"), drop=(key,))
    assert_refused(path, tmp_path, f"has no {key}", "convert_hf_to_gguf.py", code=2)


@pytest.mark.parametrize("set_, words", [
    ({"general.architecture": "gemma2"}, ["architecture 'gemma2'", "Llama-architecture"]),
    ({"llama.block_count": 0}, ["llama.block_count is 0", "positive integer"]),
    ({"llama.block_count": 6}, ["llama.block_count 6 needs at least 54 tensors"]),
    ({"llama.block_count": 4}, ["'blk.4.", "llama.block_count is 4"]),  # a block the metadata does not count
    ({"llama.rope.freq_base": float("nan")}, ["freq_base is nan"]),
    ({"llama.attention.head_count_kv": 3}, ["not a multiple of llama.attention.head_count_kv 3"]),
])
def test_gguf_bad_metadata_is_bad_input(exports, tmp_path, set_, words):
    path = gguf_copy(exports["s.gguf"], str(tmp_path / "x.gguf"), set_=set_)
    assert_refused(path, tmp_path, *words, code=2)


def test_gguf_metadata_that_disagrees_with_the_tensors_is_damaged(exports, tmp_path):
    """head_count 4 instead of 8 (head dim 8 from rope.dimension_count): q_proj would be un-permuted wrongly."""
    path = gguf_copy(exports["s.gguf"], str(tmp_path / "x.gguf"), set_={"llama.attention.head_count": 4})
    assert_damaged(path, tmp_path, Q, "[64, 64]", "[32, 64]")


def test_gguf_nan_block_scale_fails_the_decode(exports, tmp_path):
    """A Q4_0 block's f16 scale set to NaN: the header is intact (inspect passes), the decode refuses it."""
    def nan_scale(name, data):
        if name == "blk.0.attn_q.weight":
            data = data.copy()
            data[0, :2] = np.frombuffer(np.float16(math.nan).tobytes(), dtype=np.uint8)
        return data

    path = gguf_copy(exports["s.gguf"], str(tmp_path / "x.gguf"), edit=nan_scale)
    assert_damaged(path, tmp_path, Q, "NaN or Inf in its Q4_0 block scales", inspect=False)
