"""The held-out yardstick: samples scored against real images at the same N, beside the
floor that real images reach on the same scale.

- FID, precision and recall (k = 5) of the first n samples against the first n images of
  the reference split, n being the smallest of the samples, the reference split, the
  floor's split and ``MAX_IMAGES``: Fréchet distances and k-NN radii both depend on N, so
  every side of every figure has the same N.
- The floor: the other split's first n images (real images that are not the reference)
  scored the same way. With the reference held out of training (``reference_split=val``),
  it is the training images against the reference: no model of those images can be
  expected to do better, and a result below it means the yardstick is broken.
- Memorisation (``ddpm.evaluation.manifold.memorisation_rate``): samples against the
  training split, with the threshold taken from the held-out split; its floor is the
  quantile itself (0.05), held-out real images by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ddpm.evaluation.features import extract_features
from ddpm.evaluation.manifold import (
    K_NEIGHBOURS,
    MEMORISATION_QUANTILE,
    memorisation_rate,
    pixel_vectors,
    precision_recall,
)
from ddpm.evaluation.metrics import frechet_distance
from ddpm.evaluation.stats_file import ReferenceStats

MAX_IMAGES = 10_000  # images per side for precision/recall (pairwise distances: N^2)
MAX_TRAIN = 50_000  # training images searched for each sample's nearest one


def first_rows(datamodule: Any, split: str, n: int, rows: Callable[[Tensor], Tensor]) -> Tensor:
    """``rows`` of the first n images of ``split`` (a split's order is a fixed permutation
    of ``data.split_seed``), applied per streamed batch of images [B, C, H, W] in [-1, 1]:
    the split's images are never all in memory, only their rows."""
    out, kept = [], 0
    for batch in datamodule.split_batches(split):
        batch = batch[: n - kept]
        out.append(rows(batch.float() / 127.5 - 1))
        kept += len(batch)
        if kept >= n:
            break
    return torch.cat(out)


def scores(real: Tensor, fake: Tensor, k: int = K_NEIGHBOURS) -> dict[str, float | None]:
    """FID, precision and recall of features fake [n, D] against real [n, D]; precision and
    recall are None for n <= k (a k-th neighbour needs more than k images)."""
    a, b = ReferenceStats.from_features(fake), ReferenceStats.from_features(real)
    fid = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    if min(len(real), len(fake)) <= k:
        return {"fid": fid, "precision": None, "recall": None}
    precision, recall = precision_recall(real, fake, k)
    return {"fid": fid, "precision": precision, "recall": recall}


def heldout_report(
    samples: Tensor,
    datamodule: Any,
    extractor: nn.Module,
    reference_split: str = "val",
    device: torch.device | str = "cpu",
    max_images: int = MAX_IMAGES,
) -> dict[str, Any]:
    """FID, precision, recall and memorisation of ``samples`` [N, C, H, W] in [-1, 1] at
    equal N against ``reference_split`` of ``datamodule``, with the floor beside each
    (``None`` and a ``why`` where the data has no held-out split)."""
    held_out = datamodule.val_fraction > 0  # with 0, val images are training images
    other = {"val": "train", "train": "val"}.get(reference_split)  # "all": none is outside
    sizes = [len(samples), datamodule.split_size(reference_split), max_images]
    n = min(sizes + ([datamodule.split_size(other)] if held_out and other else []))

    def features(images: Tensor) -> Tensor:
        return extract_features(extractor, images, device=device)

    real = first_rows(datamodule, reference_split, n, features)
    report: dict[str, Any] = {
        "n": n,
        "reference_split": reference_split,
        "k": K_NEIGHBOURS,
        **scores(real, features(samples[:n])),
    }
    if not held_out:
        why = "data.val_fraction=0: no real images outside the training set"
        return {**report, "memorisation": None, "floor": None, "why": why}
    train = first_rows(
        datamodule, "train", min(datamodule.split_size("train"), MAX_TRAIN), pixel_vectors
    )
    val = first_rows(
        datamodule, "val", min(datamodule.split_size("val"), max_images), pixel_vectors
    )
    rate, threshold = memorisation_rate(pixel_vectors(samples[:n]), train, val)
    report |= {
        "memorisation": rate,
        "memorisation_threshold": threshold,
        "train_images_searched": len(train),
    }
    if other is None:
        return {**report, "floor": None, "why": "reference_split=all: no real image is outside"}
    floor = scores(real, first_rows(datamodule, other, n, features))
    report["floor"] = {
        "images": f"the {other} split",
        **floor,
        "memorisation": MEMORISATION_QUANTILE,
    }
    return report
