"""Beyond FID: precision and recall of samples against real images (k-NN manifolds), and a
memorisation rate of samples against the training images.

FID mixes two failures into one number: samples off the data's manifold (broken strokes)
and parts of the data the samples never reach (missing modes). Precision is the share of
samples inside the real images' manifold, recall the share of real images inside the
samples' manifold (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
assessing generative models", Sec. 3: a manifold is the union of balls around each point
reaching its k-th nearest neighbour). Neither tells a copy of a training image from a good
sample; ``memorisation_rate`` does (Sec. "memorisation" in docs/evaluation.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

K_NEIGHBOURS = 5  # the k of the k-NN radii (Kynkäänniemi et al. use 3; 5 is smoother at N~1k)
MEMORISATION_QUANTILE = 0.05  # a sample counts as a copy below held-out reals' 5% distance
PIXEL_SIZE = 32  # memorisation compares pixels area-resized to at most 32x32


def knn_radii(features: Tensor, k: int = K_NEIGHBOURS) -> Tensor:
    """Each row's distance to its k-th nearest other row [N] (its own 0 distance is the
    first of the k + 1 smallest, as in Kynkäänniemi et al.'s code)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall need more than k={k} images, got {len(features)}")
    return torch.cat(
        [
            torch.kthvalue(block, k + 1, dim=1).values
            for block in _blocks(features, features)  # [chunk, N] each
        ]
    )


def in_manifold(queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
    """Whether each query lies within radii[j] of some support point j [N_queries] (bool)."""
    return torch.cat([(block <= radii[None]).any(dim=1) for block in _blocks(queries, support)])


def precision_recall(real: Tensor, fake: Tensor, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) of features fake [N, D] against real [M, D] (Kynkäänniemi et al.
    2019, Eq. 1-2): precision = share of fake inside real's k-NN manifold, recall = share of
    real inside fake's. Both sets should be of the same size: the radii shrink with N."""
    precision = in_manifold(fake, real, knn_radii(real, k)).float().mean().item()
    recall = in_manifold(real, fake, knn_radii(fake, k)).float().mean().item()
    return precision, recall


def nearest_distance(queries: Tensor, support: Tensor) -> Tensor:
    """Each query's distance to its nearest support row [N_queries]."""
    return torch.cat([block.min(dim=1).values for block in _blocks(queries, support)])


def pixel_vectors(images: Tensor, size: int = PIXEL_SIZE) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] as pixel rows [N, C*h*w], area-resized so that the
    longer side is at most ``size`` (a copy survives resizing; 256 px would cost 64x)."""
    x = images.float()
    if max(x.shape[-2:]) > size:
        scale = size / max(x.shape[-2:])
        out = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=out, mode="area")
    return x.flatten(1)  # [N, C, h, w] -> [N, C*h*w]


def memorisation_rate(
    samples: Tensor, train: Tensor, heldout: Tensor, quantile: float = MEMORISATION_QUANTILE
) -> tuple[float, float]:
    """(rate, threshold): the share of samples closer to their nearest training image than
    ``threshold``, the ``quantile`` of held-out real images' distances to theirs. All three
    are rows in one space (``pixel_vectors``). Held-out images are real images the model
    did not copy, so a model that does not copy scores about ``quantile`` (0.05); a model
    that reproduces training images scores up to 1."""
    if len(heldout) == 0:
        raise ValueError("memorisation needs held-out real images (data.val_fraction > 0)")
    threshold = torch.quantile(nearest_distance(heldout, train).double(), quantile).item()
    rate = (nearest_distance(samples, train) < threshold).float().mean().item()
    return rate, threshold


def _blocks(queries: Tensor, support: Tensor, chunk: int = 2048):
    """Distance blocks [chunk, M] of queries against all of support."""
    support = support.float()
    for part in queries.float().split(chunk):
        yield torch.cdist(part, support)
