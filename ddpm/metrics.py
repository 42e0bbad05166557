"""FID and KID (through torchmetrics) of generated images against cached real statistics.

Real-data statistics are computed once per (data set, split, extractor, image size) and
cached on disk, so an evaluation during training costs only the generated side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm.features import atomic_save, cache_dir

KID_MAX_REAL = 10_000  # real features kept for KID (its subsets draw from these)
STATS_VERSION = 2  # bump when the data pipeline changes pixels: old caches are ignored


class _Passthrough(nn.Module):
    """torchmetrics calls its ``feature`` module on what ``update`` gets; ours are features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


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


def extract_features(
    extractor: nn.Module, images: Tensor, batch_size: int = 500, device: torch.device | str = "cpu"
) -> Tensor:
    """Features [N, D] (CPU, float32) of images [N, C, H, W] in [-1, 1], in batches."""
    extractor = extractor.to(device)
    out = [extractor(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, getattr(extractor, "num_features", 0))


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
    atomic_save(
        {
            "num_samples": stats.num_samples,
            "feature_sum": stats.feature_sum,
            "feature_outer_sum": stats.feature_outer_sum,
            "kid_features": stats.kid_features,
        },
        path,
    )
    return stats, True


def fid_kid(
    reference: ReferenceStats,
    fake_features: Tensor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) of ``fake_features`` [N, D]
    against ``reference``, computed by torchmetrics. KID's subset size is capped by the
    smaller sample; its subsets are drawn from a fixed seed, so the result is repeatable."""
    if fake_features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 generated samples, got {fake_features.shape[0]}")
    dim = fake_features.shape[1]
    fid = FrechetInceptionDistance(
        feature=_Passthrough(dim), reset_real_features=False, sync_on_compute=False
    )
    # Real-side states from the cache, exactly what update(real=True) would have summed.
    fid.real_features_sum = reference.feature_sum.clone()
    fid.real_features_cov_sum = reference.feature_outer_sum.clone()
    fid.real_features_num_samples = torch.tensor(reference.num_samples)
    fid.update(fake_features, real=False)

    subset = min(kid_subset_size, fake_features.shape[0], reference.kid_features.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": we keep few
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Passthrough(dim),
            subsets=kid_subsets,
            subset_size=subset,
            sync_on_compute=False,
        )
    kid.update(reference.kid_features, real=True)
    kid.update(fake_features.float(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    value = float(fid.compute())
    return {
        "fid": value if math.isfinite(value) else float("nan"),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
    }


def reference_key(name: str, split: str, extractor: str, image_size: int, split_id: str) -> str:
    """File-name-safe cache key of one real-data reference."""
    return f"{name}-{split}-{extractor}-{image_size}px-{split_id}-v{STATS_VERSION}"


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
        datamodule.name, split, extractor_name, datamodule.image_size, datamodule.split_id
    )
    stats, _ = reference_stats(key, lambda: datamodule.split_images(split), extractor, device)
    return key, stats


def evaluate_images(
    images: Tensor,
    datamodule: object,
    extractor_name: str | None = None,
    split: str = "train",
    device: torch.device | str = "cpu",
) -> dict[str, object]:
    """FID/KID of generated ``images`` [N, C, H, W] in [-1, 1] against ``split`` of
    ``datamodule`` (an ImageDataModule); returns the numbers and what they were measured
    against."""
    from ddpm.features import build_feature_extractor

    name = extractor_name or datamodule.feature_extractor
    extractor = build_feature_extractor(name)
    key, reference = data_reference(datamodule, split, name, extractor, device)
    metrics = fid_kid(reference, extract_features(extractor, images, device=device))
    return {
        **metrics,
        "feature_extractor": name,
        "num_samples": int(images.shape[0]),
        "reference": {
            "key": key,
            "data": datamodule.name,
            "split": split,
            "num_images": reference.num_samples,
        },
    }
