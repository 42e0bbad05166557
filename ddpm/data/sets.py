"""The data sets the data module serves: each item is (image [C, H, W] uint8, label,
index), from memory, a memory-mapped decode cache, files decoded on access, or indices
alone (device-resident mode)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.datasets import decode_image


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


class TensorImages(Dataset):
    """uint8 images held in memory; yields (image [C, H, W] uint8, label, index)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.images[i], self.labels[i], i


class Indices(Dataset):
    """Yields only indices: the device-resident mode looks the images up on the device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class FileImages(Dataset):
    """Image files decoded on access (in the loader's workers); same items as TensorImages."""

    def __init__(self, files: list[Path], labels: Tensor, image_size: int, channels: int) -> None:
        self.files, self.labels = files, labels
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return decode_image(self.files[i], self.image_size, self.channels), self.labels[i], i


class MappedImages(Dataset):
    """Items ``indices`` of a memory-mapped uint8 array [N, C, H, W] (the decode cache),
    read on access: a split is never copied, so every rank of a machine shares the pages
    of one file."""

    def __init__(self, array: Tensor, indices: Tensor, labels: Tensor) -> None:
        self.array, self.indices, self.labels = array, indices, labels

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def images(self) -> Tensor:
        """The split's images as one tensor (a copy: for device-resident mode and tests)."""
        return self.array[self.indices]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.array[int(self.indices[i])], self.labels[i], i
