"""FID and KID of generated images against real statistics."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.features import extract_features
from ddpm.evaluation.reference import data_reference, file_reference
from ddpm.evaluation.stats_file import FeatureMoments, ReferenceStats


class _Passthrough(nn.Module):
    """torchmetrics calls its ``feature`` module on what ``update`` gets; ours are features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, Eq. 6), in
    float64; tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2
    (real and >= 0 up to rounding, S1 and S2 being PSD), as torchmetrics computes it."""
    m1, m2, s1, s2 = (
        torch.as_tensor(np.asarray(a, np.float64)) for a in (mu1, mu2, sigma1, sigma2)
    )
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    value = float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)
    return value if math.isfinite(value) else float("nan")


def kid(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018) of ``fake`` [N, D] against ``real`` [M, D] through
    torchmetrics: mean and std over ``subsets`` subsets (capped by the smaller sample),
    drawn from a fixed seed, so the result is repeatable."""
    size = min(subset_size, fake.shape[0], real.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": we keep few
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Passthrough(fake.shape[1]), subsets=subsets, subset_size=size,
            sync_on_compute=False,
        )  # fmt: skip
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def fid_kid(
    reference: ReferenceStats,
    fake_features: Tensor | FeatureMoments,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    kid_features: Tensor | None = None,
) -> dict[str, float | None]:
    """FID and KID of generated features against ``reference``. ``fake_features`` is
    [N, D], or the moments of a stream of features (then KID uses ``kid_features``, a
    sample of them). KID is None when the reference carries no features (a file with only
    ``mu`` and ``sigma``)."""
    if isinstance(fake_features, FeatureMoments):
        moments = fake_features
    else:
        if fake_features.shape[0] < 2:
            raise ValueError(
                f"FID needs at least 2 generated samples, got {fake_features.shape[0]}"
            )
        moments = FeatureMoments(fake_features.shape[1])
        moments.update(fake_features)
        kid_features = fake_features
    mu, sigma = moments.mu_sigma()
    out: dict[str, float | None] = {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "kid_mean": None,
        "kid_std": None,
    }
    if reference.kid_features is not None and kid_features is not None:
        mean, std = kid(reference.kid_features, kid_features, kid_subsets, kid_subset_size, seed)
        out |= {"kid_mean": mean, "kid_std": std}
    return out


def load_reference(
    datamodule: object,
    extractor_name: str,
    extractor: nn.Module,
    split: str = "train",
    fid_reference: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[ReferenceStats, dict[str, object]]:
    """The reference to score against: the file ``fid_reference`` (checked against the
    extractor), else the cached statistics of ``split`` of ``datamodule``; returns it and
    a description for reports."""
    if fid_reference is not None:
        stats = file_reference(Path(fid_reference), extractor_name, extractor)
        described: dict[str, object] = {"file": str(fid_reference)}
        described |= {k: stats.meta[k] for k in ("data", "split") if k in stats.meta}
    else:
        key, stats = data_reference(datamodule, split, extractor_name, extractor, device)
        described = {"key": key, "data": datamodule.name, "split": split}
    return stats, {**described, "num_images": stats.num_images}


def evaluate_images(
    images: Tensor,
    datamodule: object,
    extractor_name: str | None = None,
    split: str = "train",
    device: torch.device | str = "cpu",
    fid_reference: str | Path | None = None,
) -> dict[str, object]:
    """FID/KID of generated ``images`` [N, C, H, W] in [-1, 1] against ``split`` of
    ``datamodule`` (an ImageDataModule) or the file ``fid_reference``; returns the numbers
    and what they were measured against."""
    name = extractor_name or datamodule.feature_extractor
    extractor = build_feature_extractor(name)
    reference, described = load_reference(datamodule, name, extractor, split, fid_reference, device)
    metrics = fid_kid(reference, extract_features(extractor, images, device=device))
    return {
        **metrics,
        "feature_extractor": name,
        "num_samples": int(images.shape[0]),
        "reference": described,
    }
