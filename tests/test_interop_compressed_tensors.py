"""--format compressed-tensors: the compressed-tensors package (and transformers through it) decompresses what kbit
writes to what kbit decodes, and kbit reads it back. kbit's packer and reader never import compressed-tensors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.formats.compressed_tensors import pack_rows, unpack_rows
from kbitcli.formats.registry import open_reader as open_foreign
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbitcli.models.load import load_model
from kbitcli.recipes import Recipe, parse_override
from interop_fixtures import logits, make_tiny_llama

ct = pytest.importorskip("compressed_tensors")
ROW = parse_override("model.layers.*.mlp.down_proj=block_size:row")  # stories260K's rows of 172: one scale per row


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"))


def test_packing_is_compressed_tensors_pack_to_int32():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for k in range(1, 9):
        for cols in (1, 7, 32, 33, 172, 200):
            q = torch.randint(-(2 ** (k - 1)), 2 ** (k - 1), (3, cols), generator=g, dtype=torch.int8)
            packed = pack_rows(q.to(torch.int64) + 2 ** (k - 1), k)
            assert torch.equal(packed, pack_to_int32(q, k)), (k, cols)
            assert torch.equal(unpack_rows(packed, k, cols) - 2 ** (k - 1), q.to(torch.int64))
            assert torch.equal(unpack_from_int32(packed, k, torch.Size([3, cols])), q)


def test_stories_through_transformers_equals_kbit_forward(stories_dir, tmp_path):
    """transformers loads the export through compressed-tensors (decompressing it); its logits equal kbit's own
    k-bit forward of the same int4 codes, and its decompressed weights equal kbit's decoding of the file."""
    from transformers import AutoModelForCausalLM

    recipe = Recipe(bits=4, block_size=64, dtype="int", overrides=[ROW])
    encode(stories_dir, str(tmp_path / "kbit"), recipe)
    encode(stories_dir, str(tmp_path / "ct"), recipe, fmt="compressed-tensors")
    qc = json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    strategies = {g["weights"]["strategy"]: g["weights"]["group_size"] for g in qc["config_groups"].values()}
    assert strategies == {"group": 64, "channel": None}
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"))
    ours, _ = load_model(str(tmp_path / "kbit"), tokenizer=False)
    diff = (logits(theirs) - logits(ours)).abs().max().item()
    assert diff < 1e-4, diff
    reader, native = open_foreign(str(tmp_path / "ct")), KbitCheckpoint(str(tmp_path / "kbit"))
    state = theirs.state_dict()
    for n in reader.names:
        assert torch.allclose(reader.tensor(n, torch.float32), state[n].float(), rtol=1e-6, atol=1e-7), n
        assert torch.allclose(reader.tensor(n, torch.float32), native.tensor(n, torch.float32), rtol=1e-6, atol=1e-7), n


@pytest.mark.parametrize("bits, block", [(2, 128), (3, 32), (5, "row"), (6, 64), (7, "tensor"), (8, 128)])
def test_every_width_decompresses_like_compressed_tensors(tiny, tmp_path, bits, block):
    """k = 2..8 with group, channel and tensor strategies: compressed-tensors' own decompressor, given the scheme
    from our config.json, equals kbit's reader, which equals kbit's native decoding of the same recipe."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    recipe = Recipe(bits=bits, block_size=block, dtype="int")
    encode(tiny, str(tmp_path / "ct"), recipe, fmt="compressed-tensors")
    encode(tiny, str(tmp_path / "kbit"), recipe)
    group = json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(**{k: v for k, v in group.items() if k != "format"})
    reader, native = open_foreign(str(tmp_path / "ct")), KbitCheckpoint(str(tmp_path / "kbit"))
    quantized = [n for n in reader.names if reader.is_quantized(n)]
    assert len(quantized) == 14
    for n in reader.names:
        ours = reader.tensor(n, torch.float32)
        assert torch.allclose(ours, native.tensor(n, torch.float32), rtol=1e-6, atol=1e-7), n
        if n in quantized:
            m = n[: -len(".weight")]
            parts = {p: reader.f.get(f"{m}.{p}") for p in ("weight_packed", "weight_scale", "weight_shape")}
            theirs = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
            assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=1e-7), n


def test_tiny_llama_through_transformers_equals_kbit_forward(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = Recipe(bits=3, block_size=32, dtype="int")
    encode(tiny, str(tmp_path / "ct"), recipe, fmt="compressed-tensors")
    encode(tiny, str(tmp_path / "kbit"), recipe)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"))  # decompresses on the first forward
    diff = (logits(theirs) - logits(load_model(str(tmp_path / "kbit"), tokenizer=False)[0])).abs().max().item()
    assert diff < 1e-4, diff


def test_reads_asymmetric_checkpoint_compressed_tensors_wrote(tiny, tmp_path):
    """compressed-tensors itself quantizes and packs an asymmetric int4 group-32 scheme; kbit decodes it to what
    compressed-tensors decompresses it to."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    from kbitcli.formats.source import open_source

    dense = open_source(tiny)
    tensors, decompressed = {}, {}
    for n in dense.names:
        w = dense.get(n)
        if n.endswith("proj.weight"):
            g = w.reshape(w.shape[0], -1, 32)
            scale, zp = calculate_qparams(g.amin(dim=-1), g.amax(dim=-1), args)
            m = n[: -len(".weight")]
            comp = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                        scheme)
            tensors.update({f"{m}.{k}": v.contiguous() for k, v in comp.items()})
            decompressed[n] = PackedQuantizationCompressor.decompress(comp, scheme)["weight"]
        else:
            tensors[n] = w
    out = tmp_path / "asym"
    os.makedirs(out)
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"group_0": scheme.model_dump()}, "ignore": ["lm_head"]}
    json.dump(cfg, open(out / "config.json", "w"))
    reader = open_foreign(str(out))
    for n, ref in decompressed.items():
        assert torch.allclose(reader.tensor(n, torch.float32), ref.float(), rtol=1e-6, atol=1e-7), n


@pytest.mark.parametrize("recipe, words", [
    (Recipe(dtype="nf", overrides=[ROW]), ["integer codes", "--data-type int"]),
    (Recipe(dtype="int", double_quant=True, overrides=[ROW]), ["one float scale", "--no-double-quant"]),
    (Recipe(dtype="int"), ["172 values", "model.layers.*.mlp.down_proj=block_size:row"]),
    (Recipe(dtype="int", overrides=[ROW], targets=["re:.*proj.weight", "model.embed_tokens.weight"]), ["nn.Linear"]),
])
def test_refuses_what_compressed_tensors_cannot_hold(stories_dir, tmp_path, recipe, words):
    with pytest.raises(KbitError) as e:
        encode(stories_dir, str(tmp_path / "out"), recipe, fmt="compressed-tensors")
    assert e.value.exit_code == 2 and all(w in str(e.value) for w in words), str(e.value)
    assert os.listdir(tmp_path) == []
