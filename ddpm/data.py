"""ImageDataModule and the dataset builders that feed it.

A builder returns every image of a data set as a float tensor in [0, 1] of shape
[N, C, H, W] plus int64 labels [N]; the module resizes, scales to [-1, 1] (the range the
diffusion process assumes, Ho et al. 2020 Sec. 3.3) and splits train/val deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


def load_digits_images(root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 17 grey levels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (
        torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    )  # [N, 8, 8] -> [N, 1, 8, 8]
    return images, torch.from_numpy(digits.target).long()


DATASETS: dict[str, Callable[[str | Path | None], tuple[Tensor, Tensor]]] = {
    "digits": load_digits_images,
}


class IndexedDataset(Dataset):
    """Yields (image, label, index): validation derives its fixed noise from the index."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.images[i], self.labels[i], i


class ImageDataModule(L.LightningDataModule):
    """Images in [-1, 1], held in memory, split into train/val by a fixed seed."""

    def __init__(
        self,
        name: str = "digits",
        root: str | None = None,
        image_size: int = 8,
        channels: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        feature_extractor: str = "digits",
    ) -> None:
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r} is unknown; choose one of {sorted(DATASETS)}")
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be a positive integer")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be a positive integer")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.name, self.root = name, root
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.val_fraction, self.split_seed = batch_size, val_fraction, split_seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.feature_extractor = feature_extractor  # the FID/KID features suited to this data
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def load_images(self) -> tuple[Tensor, Tensor]:
        """All images in [-1, 1] at ``image_size``, [N, C, H, W], with their labels."""
        images, labels = DATASETS[self.name](self.root)
        if images.shape[1] != self.channels:
            raise ValueError(
                f"data.channels={self.channels} but data set {self.name!r} has "
                f"{images.shape[1]} channels; set data.channels={images.shape[1]}"
            )
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp(0.0, 1.0)
        return images * 2.0 - 1.0, labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_images()
        n_val = max(1, round(self.val_fraction * images.shape[0]))
        if n_val >= images.shape[0]:
            raise ValueError(
                f"data set {self.name!r} has too few images ({images.shape[0]}) to split"
            )
        order = torch.randperm(
            images.shape[0], generator=torch.Generator().manual_seed(self.split_seed)
        )
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = IndexedDataset(images[val_idx], labels[val_idx])

    def split_images(self, split: str) -> Tensor:
        """All images of ``split`` (``train``, ``val`` or ``all``), [N, C, H, W] in [-1, 1]."""
        self.setup("fit")
        if split == "train":
            return self.train_set.tensors[0]
        if split == "val":
            return self.val_set.images
        if split == "all":
            return torch.cat([self.train_set.tensors[0], self.val_set.images])
        raise ValueError(f"eval.reference_split={split!r} is unknown; choose train, val or all")

    @property
    def split_id(self) -> str:
        """Identifies the split (for caches): fraction and seed."""
        return f"val{self.val_fraction:g}-seed{self.split_seed}"

    def train_dataloader(self) -> DataLoader:
        n_train = len(self.train_set)
        return self._loader(self.train_set, shuffle=True, drop_last=n_train >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
