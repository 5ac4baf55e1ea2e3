"""Issue 10's property-based suite for the foreign readers: hypothesis mutates the metadata that tells kbit how to
read another engine's checkpoint — a bitsandbytes quant_state, a compressed-tensors quantization scheme — and
`kbit decode` must end in one of two ways:

- exit 0 with the same weights as the undamaged checkpoint (a mutation that changes nothing kbit reads, such as
  a float dtype name for the same values, may pass; anything that would change the weights may not);
- or exit 1/2 with exactly one line `kbit: error: ...`, nothing on stdout, no traceback, nothing in DST's folder.

The source is never touched (sha256 before and after). Derandomized and bounded, like test_hostile_properties."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_hostile_properties import PROPERTY, assert_refused, junk, tree_hash

from kbit_cli import cli

Q = "model.layers.1.self_attn.q_proj.weight"  # 64 x 64
STATE = f"{Q}.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def originals(stories_dir, tmp_path_factory):
    """stories260K exported as bnb nf4 and compressed-tensors int4, and each one's reference decode."""
    root = tmp_path_factory.mktemp("foreign-props")
    out = {}
    for name, flags in {"bnb": ["--format", "bnb"],
                        "ct": ["--format", "compressed-tensors", "--override",
                               "model.layers.*.mlp.down_proj=block_size:row"]}.items():
        assert cli("encode", stories_dir, root / name, *flags, "--quiet").code == 0
        assert cli("decode", root / name, root / f"{name}-dense", "--quiet").code == 0
        out[name] = (str(root / name), load_file(str(root / f"{name}-dense" / "model.safetensors")))
    return out


def decode_outcome(src: str, reference: dict, tmp: str) -> str:
    """Decode src; either the reference weights (exit 0) or a clean refusal. Returns which."""
    before = tree_hash(src)
    out_dir = os.path.join(tmp, "out")
    os.makedirs(out_dir)
    dst = os.path.join(out_dir, "dense")
    r = cli("decode", src, dst, "--quiet")
    assert tree_hash(src) == before, "the source was modified"
    if r.code == 0:
        got = load_file(os.path.join(dst, "model.safetensors"))
        assert got.keys() == reference.keys()
        for k, v in reference.items():
            assert got[k].shape == v.shape, k
            assert torch.allclose(got[k].float(), v.float(), rtol=1e-2, atol=1e-3), f"{k}: decoded to other values"
        return "same"
    assert_refused(r, out_dir, dst)
    return "refused"


def fresh(src: str, tmp_path) -> str:
    tmp = str(tmp_path / f"case-{len(os.listdir(tmp_path))}")
    shutil.copytree(src, os.path.join(tmp, "ck"))
    return tmp


state_fields = st.sampled_from(["shape", "blocksize", "quant_type", "dtype", "nested_blocksize", "nested_offset",
                                "extra"])
state_values = st.one_of(junk, st.sampled_from([[64, 64], [32, 64], [64, 32], [4096], [64, 64, 1], 32, 64, 128, 4096,
                                                "nf4", "fp4", "float16", "bfloat16", "float32", "int8"]))


@settings(PROPERTY, max_examples=250)
@given(field=state_fields, value=state_values, delete=st.booleans())
def test_mutated_bnb_quant_state_decodes_the_same_or_is_refused(originals, tmp_path_factory, field, value, delete):
    src, reference = originals["bnb"]
    tmp = fresh(src, tmp_path_factory.mktemp("bnb"))
    path = os.path.join(tmp, "ck", "model.safetensors")
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(path)
    state = json.loads(bytes(tensors[STATE].tolist()).decode())
    if delete:
        state.pop(field, None)
    else:
        state[field] = value
    tensors[STATE] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, path, metadata=metadata)
    event(decode_outcome(os.path.join(tmp, "ck"), reference, tmp))


scheme_fields = st.sampled_from(["num_bits", "type", "symmetric", "strategy", "group_size", "block_structure",
                                 "dynamic", "actorder"])
scheme_values = st.one_of(junk, st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 32, 63, 64, "int", "float", "channel",
                                                 "group", "tensor", "block", True, False, [64, 64]]))


@settings(PROPERTY, max_examples=250)
@given(field=scheme_fields, value=scheme_values, delete=st.booleans())
def test_mutated_compressed_tensors_scheme_decodes_the_same_or_is_refused(originals, tmp_path_factory, field, value,
                                                                          delete):
    src, reference = originals["ct"]
    tmp = fresh(src, tmp_path_factory.mktemp("ct"))
    cfg_path = os.path.join(tmp, "ck", "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    for group in cfg["quantization_config"]["config_groups"].values():
        if delete:
            group["weights"].pop(field, None)
        else:
            group["weights"][field] = value
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    event(decode_outcome(os.path.join(tmp, "ck"), reference, tmp))


def test_a_group_larger_than_the_row_is_one_group_not_a_huge_allocation(originals, tmp_path):
    """Found by the property above: group_size 55,804,481 made the reader repeat each scale that many times
    (a 38 GB allocation, an internal error). A group larger than the row is one group per row."""
    src, reference = originals["ct"]
    tmp = fresh(src, tmp_path)
    cfg_path = os.path.join(tmp, "ck", "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    for group in cfg["quantization_config"]["config_groups"].values():
        group["weights"]["group_size"] = 55804481
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    assert decode_outcome(os.path.join(tmp, "ck"), reference, tmp) in ("same", "refused")
