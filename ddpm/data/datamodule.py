"""ImageDataModule: images as uint8 on the host, scaled to [-1, 1] (the range the diffusion
process assumes, Ho et al. 2020 Sec. 3.3) and flipped after the transfer to the device.

Data sets come from ``ddpm.data.datasets``; the train/val split is a fixed permutation of the
training files, so it is the same on every run and every rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ddpm.data.batches import StepBatchSampler
from ddpm.data.datasets import BUILDERS
from ddpm.data.decoded import decoded_images, verified_files
from ddpm.data.fingerprint import combine, files_fingerprint, tensor_fingerprint
from ddpm.data.sets import FileImages, Indices, MappedImages, TensorImages, to_unit_range
from ddpm.data.shards import ShardImages, chunk_of_items, read_manifest

VAL_SIZE = 1000  # validation images with val_fraction=0, unless data.val_size says


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of uint8 [N, C, H, W] to [N, C, size, size]."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.round().clamp(0, 255).to(torch.uint8)


class ImageDataModule(L.LightningDataModule):
    """One data set, split into train/val by a fixed seed, batches of (x, label, index)."""

    def __init__(
        self,
        name: str = "digits",
        root: str | None = None,
        image_size: int = 8,
        channels: int = 1,
        batch_size: int = 64,
        global_batch_size: int | None = None,
        val_fraction: float = 0.1,
        val_size: int | None = None,
        split_seed: int = 0,
        num_workers: int | None = 0,
        pin_memory: bool = False,
        feature_extractor: str = "digits",
        download: bool = False,
        in_memory: bool = True,
        hflip: bool = False,
        skip_bad_files: bool = False,
        device_resident: bool = False,
        conditional: bool = False,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if name not in (*BUILDERS, "shards"):
            names = sorted([*BUILDERS, "shards"])
            raise ValueError(f"data.name={name!r} is unknown; choose one of {names}")
        if name == "folder" and not root:
            raise ValueError("data=folder needs the images' location: data.root=/path/to/images")
        if name == "shards" and not root:
            raise ValueError(
                "data=shards needs the shards' location: data.root=DIR (or s3://..., written "
                "by python -m ddpm.data.shards SRC DST)"
            )
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be a positive integer")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} must be 1 (grey) or 3 (RGB)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be a positive integer")
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"data.global_batch_size={global_batch_size} must be >= 1, or null")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={val_fraction} must lie in [0, 1) (0: train on every "
                "image and validate on data.val_size of them)"
            )
        if val_size is not None and (val_fraction > 0 or val_size < 1):
            raise ValueError(
                f"data.val_size={val_size} is for data.val_fraction=0 (validation on a fixed "
                "subset of the training images) and must be a positive integer; with "
                f"data.val_fraction={val_fraction:g} set data.val_size=null"
            )
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0, or null (automatic)")
        self.name, self.root, self.download = name, root, download
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.val_fraction, self.split_seed = batch_size, val_fraction, split_seed
        # per device; a recipe's global batch sets it once the device count is known
        self.global_batch_size = global_batch_size
        self.val_size = val_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.feature_extractor = feature_extractor  # the FID/KID features suited to this data
        self.in_memory, self.hflip, self.skip_bad_files = in_memory, hflip, skip_bad_files
        if device_resident and not in_memory:
            raise ValueError("data.device_resident=true needs data.in_memory=true")
        # The whole uint8 set lives on the training device; loaders yield indices only.
        self.device_resident = device_resident
        self._resident: dict[str, tuple[Tensor, Tensor]] = {}
        # True: the labels condition the model (classifier-free guidance); the net's
        # number of classes is taken from the data (``num_classes``).
        self.conditional = conditional
        self.num_classes = 0
        # The training order is a function of (shuffle_seed, step): see ddpm.data.batches.
        self.shuffle_seed = shuffle_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._content: str | None = None  # what identifies the pixels, where known cheaply
        self._train_chunks: Tensor | None = None  # shards: the chunk of every training item

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.name == "shards":
            self._setup_shards()
            return
        root = Path(self.root).expanduser() if self.root else Path("data")
        source = BUILDERS[self.name](root, self.download, self.channels)
        if self.conditional and source.loose:
            raise ValueError(
                f"data.conditional=true takes each image's class from its subfolder, but "
                f"{root} also has {len(source.loose)} images directly under it "
                f"({source.loose[0].name}, ...): move them into a class subfolder, or train "
                "with data.conditional=false"
            )
        labels, decoded = source.labels, None
        if source.files is not None and self.in_memory:  # once per machine, memory-mapped
            decoded, labels, self._content = decoded_images(
                source.files, labels, self.image_size, self.channels, self.skip_bad_files
            )
        elif source.files is not None:  # headers checked once per machine
            source.files, labels = verified_files(source.files, labels, self.skip_bad_files)
        else:
            images = source.images
            if images.shape[1] != self.channels:
                raise ValueError(
                    f"data.channels={self.channels} but data set {self.name!r} has "
                    f"{images.shape[1]} channels; set data.channels={images.shape[1]}"
                )
            images = resize_uint8(images, self.image_size)
        train_idx, val_idx = self._split(labels)
        if decoded is not None:
            self.train_set = MappedImages(decoded, train_idx, labels[train_idx])
            self.val_set = MappedImages(decoded, val_idx, labels[val_idx])
        elif source.files is not None:
            files, size, channels = source.files, self.image_size, self.channels
            self.train_set = FileImages(
                [files[i] for i in train_idx], labels[train_idx], size, channels
            )
            self.val_set = FileImages([files[i] for i in val_idx], labels[val_idx], size, channels)
        else:
            self.train_set = TensorImages(images[train_idx], labels[train_idx])
            self.val_set = TensorImages(images[val_idx], labels[val_idx])

    def _setup_shards(self) -> None:
        """``data=shards``: the manifest's labels and chunks; items decoded on access."""
        if self.in_memory:
            raise ValueError(
                "data=shards streams its images: set data.in_memory=false (data=shards does)"
            )
        manifest = read_manifest(str(self.root))
        labels = torch.tensor(manifest["labels"], dtype=torch.long)
        train_idx, val_idx = self._split(labels)
        self._content = combine(json.dumps(manifest, sort_keys=True))
        chunks = chunk_of_items(manifest["chunk_sizes"])  # [N]
        self._train_chunks = chunks[train_idx]
        root, size, channels = str(self.root), self.image_size, self.channels
        self.train_set = ShardImages(root, train_idx, labels[train_idx], size, channels)
        self.val_set = ShardImages(root, val_idx, labels[val_idx], size, channels)

    def _split(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(train, val) indices: a fixed permutation of ``split_seed``, the same on every
        run and rank; sets the class count and checks it for conditional runs."""
        n = labels.shape[0]
        self.num_classes = int(labels.max()) + 1 if n else 0
        if self.conditional and self.num_classes < 2:
            raise ValueError(
                f"data.conditional=true needs labelled data, but {self.name!r} has "
                f"{self.num_classes} class(es); for image folders put one subfolder per class"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        if self.val_fraction > 0:  # held out: validation images are never trained on
            n_val = max(1, round(self.val_fraction * n))
            if n_val >= n:
                raise ValueError(f"data set {self.name!r} has too few images ({n}) to split")
            return order[n_val:], order[:n_val]
        # every image trains (Ho et al.); validation on a fixed subset of them
        return order, order[: min(self.val_size or VAL_SIZE, n)]

    def split_images(self, split: str) -> Tensor:
        """All images of ``split`` (``train``, ``val`` or ``all``), [N, C, H, W] in [-1, 1]."""
        self.setup("fit")
        if split == "all":
            return torch.cat([self.split_images(s) for s in self._splits_of_all()])
        dataset = self._split_set(split)
        if isinstance(dataset, TensorImages):
            return to_unit_range(dataset.images)
        return to_unit_range(torch.stack([dataset[i][0] for i in range(len(dataset))]))

    def split_size(self, split: str) -> int:
        """The number of images of ``split`` (``train``, ``val`` or ``all``)."""
        self.setup("fit")
        if split == "all":
            return sum(self.split_size(s) for s in self._splits_of_all())
        return len(self._split_set(split))

    def split_batches(self, split: str, batch_size: int = 500) -> Iterator[Tensor]:
        """The images of ``split`` as uint8 batches [B, C, H, W], in order, decoded by the
        loader's workers where they are files: the split is never held whole."""
        self.setup("fit")
        for part in self._splits_of_all() if split == "all" else [split]:
            dataset = self._split_set(part)
            if isinstance(dataset, TensorImages):
                yield from dataset.images.split(batch_size)
                continue
            workers = self._workers(dataset)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
            for images, _, _ in loader:
                yield images

    def split_labels(self, split: str) -> Tensor:
        self.setup("fit")
        return self._split_set(split).labels

    def _split_set(self, split: str) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"eval.reference_split={split!r} is unknown; choose train, val or all")
        return self.train_set if split == "train" else self.val_set

    def _splits_of_all(self) -> list[str]:
        """The splits whose union is every image: with val_fraction=0 the validation
        images are training images, so ``train`` alone."""
        return ["train", "val"] if self.val_fraction > 0 else ["train"]

    def split_fingerprint(self, split: str) -> str:
        """Identifies the images of ``split`` for caches: a digest of the resolved root,
        channels, size and content (the decoded uint8 images; in streaming mode the
        files' paths, sizes and times), so two data sets never share an entry and
        changed files are noticed."""
        self.setup("fit")
        if split == "all":
            parts = [self.split_fingerprint(s) for s in self._splits_of_all()]
            return combine("all", *parts)
        dataset = self._split_set(split)
        if self._content is not None:  # the decode cache's key, or the shards' manifest
            split_of = (self.split_seed, self.val_fraction, self.val_size)
            content = combine(self._content, *split_of)
        elif isinstance(dataset, TensorImages):
            content = tensor_fingerprint(dataset.images)
        else:
            content = files_fingerprint(dataset.files)
        root = self.root if self.name == "shards" else ""
        root = root or (Path(self.root).expanduser().resolve() if self.root else "")
        return combine(self.name, root, self.channels, self.image_size, split, content)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: uint8 -> [-1, 1], and random horizontal flips while training.
        In device-resident mode the batch is indices into the set held on the device."""
        training = self.trainer is not None and self.trainer.training
        if isinstance(batch, Tensor):  # device-resident: [B] indices
            images, labels = self._on_device("train" if training else "val", batch.device)
            batch = (images[batch], labels[batch], batch)
        x, y, index = batch
        x = to_unit_range(x)
        if self.hflip and training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5  # no host sync
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y, index

    def _on_device(self, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
        """The split's uint8 images and labels, copied to ``device`` once."""
        if split not in self._resident or self._resident[split][0].device != device:
            dataset = self.train_set if split == "train" else self.val_set
            self._resident[split] = (dataset.images.to(device), dataset.labels.to(device))
        return self._resident[split]

    def train_dataloader(self) -> DataLoader:
        """Batches in an order fixed by ``shuffle_seed`` and the trainer's step (exact
        resume), each rank taking its own share of every epoch."""
        trainer = self.trainer
        batch_sampler = StepBatchSampler(
            len(self.train_set),
            self.batch_size,
            seed=self.shuffle_seed,
            position=(lambda: trainer.global_step * trainer.accumulate_grad_batches)
            if trainer is not None
            else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            groups=self._train_chunks,  # shards: each rank reads its own chunks
        )
        return self._loader(self.train_set, batch_sampler=batch_sampler)

    def val_dataloader(self) -> DataLoader:
        """Every rank validates its share of the held-out images (all of them on one)."""
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                self.val_set, trainer.world_size, trainer.global_rank, shuffle=False
            )
        return self._loader(self.val_set, sampler=sampler, batch_size=self.batch_size)

    def _workers(self, dataset: Dataset) -> int:
        """``data.num_workers``, or when null: none for images in memory (a batch is a
        slice), else the CPUs of this process's share of the machine, up to 8."""
        if self.num_workers is not None:
            return self.num_workers
        if isinstance(dataset, TensorImages | MappedImages):
            return 0
        trainer = self.trainer
        local = max(1, trainer.num_devices) if trainer is not None else 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return max(1, min(8, cpus // local - 1))

    def _loader(self, dataset: Dataset, **order: Any) -> DataLoader:
        workers = 0 if self.device_resident else self._workers(dataset)
        if self.device_resident:  # indices only: no workers, nothing to pin
            dataset = Indices(len(dataset))
        return DataLoader(
            dataset,
            **order,
            num_workers=workers,
            pin_memory=self.pin_memory and not self.device_resident,
            persistent_workers=workers > 0,
        )
