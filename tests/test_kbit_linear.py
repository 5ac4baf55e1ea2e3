"""KbitLinear against the reference decoder (core.blockwise.dequantize) on real weights of stories260K and MiniLM."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from kbitcli.core.blockwise import Spec, dequantize, quantize
from kbitcli.models import kbit_linear
from kbitcli.core.pack import pack, unpack
from kbitcli.models.kbit_linear import KbitLinear, share_tables, unpack_codes


@pytest.fixture(scope="module")
def stories_weights(stories_dir):
    with safe_open(os.path.join(stories_dir, "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.fixture(scope="module")
def minilm_ffn(minilm_dir):
    with safe_open(os.path.join(minilm_dir, "model.safetensors"), "pt") as h:
        return (h.get_tensor("encoder.layer.0.intermediate.dense.weight"),
                h.get_tensor("encoder.layer.0.intermediate.dense.bias"))


W_UP = "model.layers.0.mlp.up_proj.weight"  # [172, 64]
W_DOWN = "model.layers.0.mlp.down_proj.weight"  # [64, 172]: rows of 172 run across block boundaries


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_unpack_codes_equals_core_unpack(bits):
    torch.manual_seed(bits)
    n = 1000 * 8 + 5  # a ragged tail: the last byte is partly padding
    codes = torch.randint(0, 2**bits, (n,))
    packed = pack(codes, bits)
    out = unpack_codes(packed, bits, n)
    assert out.dtype == torch.int32 and torch.equal(out.long(), unpack(packed, bits, n))
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name", [W_UP, W_DOWN])
def test_dequantize_weight_equals_reference(stories_weights, bits, name, monkeypatch):
    w = stories_weights[name]
    qt = quantize(w, Spec(bits, 64, "nf"), name)
    ref = dequantize(qt)
    m = KbitLinear.from_quantized(qt)
    assert torch.equal(m.dequantize_weight(), ref)
    monkeypatch.setattr(kbit_linear, "SLAB_VALUES", 700)  # many small slabs: exercises the slab boundaries
    assert len(m.slabs()) > 1
    assert torch.equal(m.dequantize_weight(), ref)


@pytest.mark.parametrize("spec", [Spec(4, 64, "nf", double_quant=True), Spec(3, 128, "fp"), Spec(5, 16, "int"),
                                  Spec(4, 172, "quantile"), Spec(6, 64, "dynamic", scale_dtype="fp32"),
                                  Spec(4, 64 * 172, "nf")])
def test_dequantize_weight_all_layouts(stories_weights, spec, monkeypatch):
    w = stories_weights[W_DOWN]
    qt = quantize(w, spec, W_DOWN)
    m = KbitLinear.from_quantized(qt)
    monkeypatch.setattr(kbit_linear, "SLAB_VALUES", 500)
    assert torch.equal(m.dequantize_weight(), dequantize(qt))


def test_unaligned_rows_fall_back_to_general_decoder(stories_weights):
    # block 128 over rows of 172: rows 1..31 start mid-block, so dequantize_rows takes the general path
    qt = quantize(stories_weights[W_DOWN], Spec(5, 128, "nf"), W_DOWN)
    m = KbitLinear.from_quantized(qt)
    ref = dequantize(qt)
    assert torch.equal(m.dequantize_rows(3, 10), ref[3:10])


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_forward_matches_dense_linear_on_minilm(minilm_ffn, bits, monkeypatch):
    w, b = minilm_ffn  # [1536, 384]
    qt = quantize(w, Spec(bits, 64, "nf"), "ffn")
    m = KbitLinear.from_quantized(qt, b)
    assert (m.in_features, m.out_features) == (384, 1536)
    torch.manual_seed(0)
    x = torch.randn(2, 7, 384)
    ref = F.linear(x, dequantize(qt), b)
    monkeypatch.setattr(kbit_linear, "SLAB_VALUES", 384 * 100)
    assert len(m.slabs()) > 1
    out = m(x)
    assert out.shape == (2, 7, 1536) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # bf16 activations: the matmul runs in bf16 and returns bf16
    out16 = m(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, rtol=3e-2, atol=3e-2)
    # compute_dtype overrides the activations' dtype, the output keeps the caller's
    m.compute_dtype = torch.bfloat16
    assert m(x).dtype == torch.float32
    torch.testing.assert_close(m(x), out16.float(), rtol=1e-2, atol=1e-2)


def test_transposed_matches_conv1d(minilm_ffn, monkeypatch):
    from transformers.pytorch_utils import Conv1D

    w, b = minilm_ffn
    wt = w.t().contiguous()  # Conv1D stores [in, out]
    qt = quantize(wt, Spec(4, 64, "nf"), "c_fc.weight")
    m = KbitLinear.from_quantized(qt, b, transposed=True)
    assert (m.in_features, m.out_features) == (384, 1536)
    conv = Conv1D(1536, 384)
    with torch.no_grad():
        conv.weight.copy_(dequantize(qt))
        conv.bias.copy_(b)
    x = torch.randn(3, 5, 384)
    monkeypatch.setattr(kbit_linear, "SLAB_VALUES", 1536 * 64)
    assert len(m.slabs()) > 1
    torch.testing.assert_close(m(x), conv(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(m.dequantize_weight(), dequantize(qt).t())


def test_holds_only_packed_state(minilm_ffn):
    w, b = minilm_ffn
    qt = quantize(w, Spec(4, 64, "nf"), "ffn")
    m = KbitLinear.from_quantized(qt, b)
    params = dict(m.named_parameters())
    assert list(params) == ["bias"] and not params["bias"].requires_grad
    assert m.codes.dtype == torch.uint8 and m.codes.numel() == w.numel() // 2
    assert m.scales.numel() == math.ceil(w.numel() / 64)
    assert all(t.numel() < w.numel() // 2 + 1 for t in m.buffers())
    # state_dict holds the checkpoint's components, not the derived lookup table
    assert set(m.state_dict()) == {"codes", "scales", "codebook", "bias"}
    # 4 bits + 16/64 scale bits per value; bias, the 16-entry codebook and the 256-entry byte table are small change
    expected = w.numel() * (4 + 16 / 64) / 8
    assert expected <= m.memory_bytes() <= expected + b.numel() * 4 + 16 * 4 + 256 * 8
    assert m.bits_per_param() == pytest.approx(4.25)


def test_share_tables_dedupes_codebooks(stories_weights):
    mods = [KbitLinear.from_quantized(quantize(stories_weights[n], Spec(4, 64, "nf"), n)) for n in (W_UP, W_DOWN)]
    other = KbitLinear.from_quantized(quantize(stories_weights[W_UP], Spec(4, 64, "fp"), W_UP))
    share_tables(mods + [other])
    assert mods[0].codebook is mods[1].codebook and mods[0].lut is mods[1].lut
    assert other.codebook is not mods[0].codebook
    x = torch.randn(4, 64)
    torch.testing.assert_close(mods[0](x), F.linear(x, mods[0].dequantize_weight()))


@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_reach_the_input(minilm_ffn, transposed, monkeypatch):
    """Frozen k-bit base, trainable things around it (LoRA): d out / d x must be the dense layer's."""
    w, b = minilm_ffn
    stored = w.t().contiguous() if transposed else w
    qt = quantize(stored, Spec(4, 64, "nf"), "ffn")
    m = KbitLinear.from_quantized(qt, b, transposed=transposed)
    monkeypatch.setattr(kbit_linear, "SLAB_VALUES", 384 * 200)  # several slabs
    x = torch.randn(2, 3, 384, requires_grad=True)
    m(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, m.dequantize_weight(), b).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    assert all(not t.requires_grad for t in m.parameters())
