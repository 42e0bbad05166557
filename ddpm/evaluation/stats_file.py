"""Feature statistics for FID as portable ``.npz`` files, and their streaming accumulator.

A file holds ``mu`` [D] and ``sigma`` [D, D] (float64): the names and layout of
pytorch-fid's ``--save-stats`` files and of the ADM evaluator's reference batches, so those
load here and ours load there. Beside them it records what made them (``extractor``,
``extractor_hash``, ``num_images``, ``resize``, ``quantization``, ``data``, ``split``) and,
optionally, ``kid_features`` (a fixed sample of the features, which KID needs).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.utils.files import atomic_open

KID_MAX_REAL = 10_000  # features kept for KID (its subsets draw from these)
FORMAT_VERSION = 1
META_KEYS = ("extractor", "extractor_hash", "num_images", "resize", "quantization", "data", "split")


class FeatureMoments:
    """Running sum and sum of outer products of features in float64 [D], [D, D], so the
    mean and covariance of any number of features need bounded memory."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        f = features.detach().cpu().double()  # [B, D]
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f  # [D, B] @ [B, D] -> [D, D]

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (as np.cov and torchmetrics compute them)."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 samples, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), sigma.numpy()


@dataclass
class ReferenceStats:
    """The real side of FID (mean, covariance) and KID (a feature sample), with its origin."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    kid_features: Tensor | None = None  # [K <= KID_MAX_REAL, D] float32; None: no KID
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def num_images(self) -> int | None:
        value = self.meta.get("num_images")
        return int(value) if value is not None else None

    @classmethod
    def from_features(cls, features: Tensor, **meta: Any) -> ReferenceStats:
        """Statistics of ``features`` [N, D]; ``meta`` records what made them."""
        return cls.from_stream([features], features.shape[0], **meta)

    @classmethod
    def from_stream(cls, parts: Iterable[Tensor], count: int, **meta: Any) -> ReferenceStats:
        """Statistics of ``count`` features arriving in ``parts`` ([B, D] each, in order),
        in memory bounded by one part and the KID sample: the moments accumulate in
        float64, and the KID sample is the same random subset ``from_features`` keeps."""
        keep = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:KID_MAX_REAL]
        slot = torch.full((count,), -1, dtype=torch.long)  # [N]: where each kept one goes
        slot[keep] = torch.arange(keep.shape[0])
        moments, kid, seen = None, None, 0
        for part in parts:
            part = part.detach().float().cpu()  # [B, D]
            if moments is None:
                moments = FeatureMoments(part.shape[1])
                kid = torch.zeros(keep.shape[0], part.shape[1])
            moments.update(part)
            where = slot[seen : seen + part.shape[0]]  # [B]
            kid[where[where >= 0]] = part[where >= 0]
            seen += part.shape[0]
        if moments is None or seen != count:
            raise ValueError(f"expected features of {count} images, got {seen}")
        mu, sigma = moments.mu_sigma()
        return cls(mu, sigma, kid, {**meta, "num_images": count})

    def save(self, path: Path, kid_features: bool = True) -> None:
        """Write the ``.npz`` (atomically: a killed write leaves no half file)."""
        arrays: dict[str, Any] = {"mu": self.mu, "sigma": self.sigma}
        arrays |= {k: np.array(v) for k, v in self.meta.items() if k in META_KEYS}
        arrays["format_version"] = np.array(FORMAT_VERSION)
        if kid_features and self.kid_features is not None:
            arrays["kid_features"] = self.kid_features.numpy()
        with atomic_open(Path(path)) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> ReferenceStats:
        """Read ours, pytorch-fid's or the ADM evaluator's ``.npz`` (``mu``, ``sigma``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fid_reference={path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise ValueError(
                        f"{path} has no 'mu' and 'sigma' arrays ({', '.join(data.files)}): "
                        "make one with python -m ddpm.evaluation.reference"
                    )
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                kid = torch.from_numpy(data["kid_features"]) if "kid_features" in data else None
                meta = {k: data[k].item() for k in META_KEYS if k in data}
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path} is not a readable .npz file ({exc})") from exc
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit")
        return cls(mu, sigma, kid, meta)

    def check_fits(self, extractor: str, dim: int, extractor_hash: str, source: str) -> None:
        """Refuse (one line) statistics of another feature space than ``extractor``'s."""
        fix = (
            f"make a reference with python -m ddpm.evaluation.reference "
            f"feature_extractor={extractor} ... out=FILE.npz"
        )
        made_with = self.meta.get("extractor")
        if made_with is not None and made_with != extractor:
            raise ValueError(
                f"{source} holds {made_with} features but this evaluation uses {extractor}: {fix}"
            )
        if self.dim != dim:
            raise ValueError(
                f"{source} holds {self.dim}-d statistics but {extractor} features are "
                f"{dim}-d: {fix}"
            )
        recorded = self.meta.get("extractor_hash")
        if recorded is not None and recorded != extractor_hash:
            raise ValueError(
                f"{source} was made with other {extractor} weights (hash {recorded}, these "
                f"are {extractor_hash}): {fix}"
            )
