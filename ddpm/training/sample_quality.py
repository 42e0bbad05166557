"""FID and KID during training, against cached real-data statistics."""

from __future__ import annotations

import lightning as L
import torch

from ddpm.diffusion.samplers.base import Sampler
from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.features import extract_features
from ddpm.evaluation.metrics import fid_kid, load_reference
from ddpm.training.draws import gather_strided, guidance, rank_indices


class SampleQuality(L.Callback):
    """FID and KID of ``num_samples`` generated images (EMA weights, ``sampler``) against
    cached real statistics, every ``every_n_epochs`` validation runs: logs ``val/fid``,
    ``val/kid`` and ``val/kid_std``, so ``ModelCheckpoint(monitor="val/fid")`` can keep the
    best checkpoint by FID. Each rank generates its share; features are gathered."""

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 500,
        batch_size: int = 250,
        seed: int = 1,
        sampler: Sampler | None = None,
        feature_extractor: str | None = None,
        reference_split: str = "train",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        guidance_scale: float = 0.0,
        fid_reference: str | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"eval.every_n_epochs={every_n_epochs} must be >= 1")
        if num_samples < 2:
            raise ValueError(
                f"eval.num_samples={num_samples} must be >= 2 (FID needs a covariance)"
            )
        if batch_size < 1:
            raise ValueError(f"eval.batch_size={batch_size} must be >= 1")
        self.every_n_epochs, self.num_samples, self.batch_size = (
            every_n_epochs,
            num_samples,
            batch_size,
        )
        self.seed, self.sampler = seed, sampler
        self.feature_extractor, self.reference_split = feature_extractor, reference_split
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.guidance_scale = guidance_scale  # class-conditional runs: class-balanced samples
        self.fid_reference = fid_reference  # a statistics .npz instead of the data's split
        self._validations = 0
        self._name: str | None = None
        self.extractor: torch.nn.Module | None = None
        self.reference = None

    def load_extractor(self, datamodule: L.LightningDataModule) -> None:
        """Build the feature extractor now (``ddpm.runs.prepare`` calls this before
        training, so a missing Inception download or a bad ``fid_reference`` fails the run
        at once, in one line)."""
        if self.extractor is None:
            self._name = self.feature_extractor or datamodule.feature_extractor
            self.extractor = build_feature_extractor(self._name)
        if self.fid_reference is not None and self.reference is None:  # a bad file: now
            self.reference, _ = load_reference(
                datamodule, self._name, self.extractor, fid_reference=self.fid_reference
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.reference is not None:
            return
        data = trainer.datamodule
        self.load_extractor(data)
        self.extractor.to(pl_module.device)
        self.reference, _ = load_reference(
            data,
            self._name,
            self.extractor,
            self.reference_split,
            self.fid_reference,
            pl_module.device,
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_epochs:
            return
        images = pl_module.sample(
            rank_indices(trainer, self.num_samples),
            seed=self.seed,
            batch_size=self.batch_size,
            sampler=self.sampler,
            guidance_scale=guidance(pl_module, self.guidance_scale),
        )
        local = extract_features(self.extractor, images, self.batch_size, pl_module.device)
        features = gather_strided(pl_module, local.to(pl_module.device), self.num_samples)
        # every rank holds all features and computes the same numbers: no further collective
        metrics = fid_kid(self.reference, features.cpu(), self.kid_subsets, self.kid_subset_size)
        pl_module.log("val/fid", metrics["fid"], sync_dist=False)
        if metrics["kid_mean"] is not None:  # None: the reference file has no features
            pl_module.log("val/kid", metrics["kid_mean"], sync_dist=False)
            pl_module.log("val/kid_std", metrics["kid_std"], sync_dist=False)
