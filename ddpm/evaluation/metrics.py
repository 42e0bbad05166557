"""FID and KID (through torchmetrics) of generated images against real statistics."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm.evaluation.features import build_feature_extractor, extract_features
from ddpm.evaluation.reference import ReferenceStats, data_reference


class _Passthrough(nn.Module):
    """torchmetrics calls its ``feature`` module on what ``update`` gets; ours are features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


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
