"""Real-data reference statistics for FID/KID, computed once and cached on disk, so an
evaluation costs only the generated side. The cache key is what determines the numbers:
the split's images (root, channels, size and a content fingerprint) and the feature
extractor with its weights' version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ddpm.evaluation.features import extract_features
from ddpm.utils.files import atomic_torch_save, cache_dir

KID_MAX_REAL = 10_000  # real features kept for KID (its subsets draw from these)
STATS_VERSION = 3  # bump when the data pipeline changes pixels: old caches are ignored


@dataclass
class ReferenceStats:
    """Sufficient statistics of real features for FID, plus a feature sample for KID."""

    key: str
    num_samples: int
    feature_sum: Tensor  # [D], float64
    feature_outer_sum: Tensor  # [D, D], float64: sum of f f^T
    kid_features: Tensor  # [min(N, KID_MAX_REAL), D], float32

    @classmethod
    def from_features(cls, key: str, features: Tensor) -> ReferenceStats:
        f = features.double()
        keep = torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(0))[:KID_MAX_REAL]
        return cls(key, f.shape[0], f.sum(0), f.T @ f, features[keep].float())


def reference_stats(
    key: str,
    load_images: Callable[[], Tensor],
    extractor: nn.Module,
    device: torch.device | str = "cpu",
) -> tuple[ReferenceStats, bool]:
    """Cached statistics for ``key``; computed (and cached) on a miss.

    Returns (stats, computed_now). ``key`` names the data set, split, extractor and image
    size; ``load_images`` is only called on a miss.
    """
    path = cache_dir() / "reference" / f"{key}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return ReferenceStats(key=key, **stored), False
    features = extract_features(extractor, load_images(), device=device)
    stats = ReferenceStats.from_features(key, features)
    atomic_torch_save(
        {
            "num_samples": stats.num_samples,
            "feature_sum": stats.feature_sum,
            "feature_outer_sum": stats.feature_outer_sum,
            "kid_features": stats.kid_features,
        },
        path,
    )
    return stats, True


def reference_key(
    name: str, split: str, extractor: str, extractor_version: str, images_id: str
) -> str:
    """File-name-safe cache key of one real-data reference: readable parts first, then
    ``images_id`` (a digest of the images' root, channels, size and content)."""
    return f"{name}-{split}-{extractor}-{extractor_version}-{images_id}-v{STATS_VERSION}"


def data_reference(
    datamodule: object,
    split: str,
    extractor_name: str,
    extractor: nn.Module,
    device: torch.device | str = "cpu",
) -> tuple[str, ReferenceStats]:
    """The cached statistics of ``split`` of ``datamodule`` (an ImageDataModule) under
    ``extractor``, computed on a miss; returns (cache key, stats)."""
    key = reference_key(
        datamodule.name,
        split,
        extractor_name,
        str(extractor.version),  # every extractor names its weights' version
        datamodule.split_fingerprint(split),
    )
    stats, _ = reference_stats(key, lambda: datamodule.split_images(split), extractor, device)
    return key, stats
