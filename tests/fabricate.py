"""Tiny data sets written in the real on-disk formats (tests never download)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_mnist(root: Path, folder: str = "MNIST", n: int = 40, seed: int = 0) -> np.ndarray:
    """idx-ubyte files as torchvision lays them out: <root>/<folder>/raw/train-*-idx?-ubyte."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )
    return images


def write_cifar10(root: Path, per_batch: int = 10, seed: int = 0) -> np.ndarray:
    """Five pickled batches like cifar-10-batches-py/data_batch_{1..5} (rows of 3072 bytes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    all_images = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with (folder / f"data_batch_{i}").open("wb") as f:
            pickle.dump(
                {"batch_label": f"training batch {i} of 5", "data": data, "labels": labels}, f
            )
        all_images.append(data.reshape(-1, 3, 32, 32))
    return np.concatenate(all_images)


def write_folder(root: Path, per_class: int = 6, corrupt: bool = True, seed: int = 0) -> Path:
    """PNG and JPEG files in two class subfolders, plus (optionally) one corrupt PNG."""
    rng = np.random.default_rng(seed)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)  # not square
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.{suffix}")
    bad = root / "dogs" / "broken.png"
    if corrupt:
        bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return bad
