"""Callbacks that measure and draw during training: sample grids (EMA and raw weights),
denoising trajectories, loss by timestep, and FID/KID.

Under DDP every rank does its share of the sampling and the results are gathered, so no
rank idles into a collective timeout while another one samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

from ddpm.features import build_feature_extractor
from ddpm.images import bar_chart, class_grid, make_grid, save_png, side_by_side, to_uint8
from ddpm.metrics import data_reference, extract_features, fid_kid
from ddpm.samplers import Sampler


def log_image(loggers: list[Logger], key: str, image: np.ndarray, step: int) -> None:
    """Send a uint8 [H, W, C] picture to every logger that can show one (W&B, TensorBoard)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")


def guidance(pl_module: L.LightningModule, scale: float) -> float:
    """The guidance scale to draw with: ``scale`` for a class-conditional model, else 0."""
    return scale if getattr(pl_module, "num_classes", 0) else 0.0


def rank_indices(trainer: L.Trainer, n: int) -> range:
    """This rank's share of sample indices 0..n-1: rank r takes r, r + W, r + 2W, ...
    (padded so that every rank draws the same count, as all_gather needs)."""
    world = trainer.world_size
    return range(trainer.global_rank, math.ceil(n / world) * world, world)


def sample_shared(
    trainer: L.Trainer, pl_module: L.LightningModule, num_samples: int, seed: int, **kwargs
) -> Tensor:
    """Samples 0..n-1 of ``seed``, each rank drawing its share; every rank receives all
    samples [n, C, H, W], in index order."""
    local = pl_module.sample(rank_indices(trainer, num_samples), seed=seed, **kwargs)
    return gather_strided(pl_module, local, num_samples)


def gather_strided(pl_module: L.LightningModule, local: Tensor, n: int) -> Tensor:
    """Undo the rank-strided split: [per_rank, ...] on each rank -> [n, ...] everywhere."""
    if pl_module.trainer.world_size == 1:
        return local[:n]
    gathered = pl_module.all_gather(local)  # [world, per_rank, ...]
    # [world, per_rank, ...] -> [per_rank, world, ...]: row-major order is r + world * j
    return gathered.transpose(0, 1).reshape(-1, *local.shape[1:])[:n]


def _run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


class SampleGrid(L.Callback):
    """After each validation: a grid of ``num_samples`` images from a fixed seed drawn with
    the EMA weights (``samples/grid_epoch=E_step=S.png``), the same seed drawn with the raw
    weights beside it (``samples/ema_vs_raw_step=S.png``), and a denoising trajectory of a
    few samples (``samples/trajectory_step=S.png``: x_t from t = T-1 down to x_0).

    ``EMAWeightAveraging`` swaps the EMA weights in for the whole validation loop and
    ``ddpm.cli`` puts it after this callback, so the raw weights are drawn at validation
    start and the EMA weights at validation end.
    """

    def __init__(
        self,
        num_samples: int = 64,
        seed: int = 0,
        sampler: Sampler | None = None,
        raw_weights: bool = True,
        trajectory_samples: int = 4,
        trajectory_frames: int = 8,
        dirname: str = "samples",
        guidance_scale: float = 0.0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"callbacks.sample_grid.num_samples={num_samples} must be >= 1")
        if trajectory_samples < 0 or trajectory_frames < 2:
            raise ValueError(
                "callbacks.sample_grid.trajectory_samples must be >= 0 and trajectory_frames >= 2"
            )
        self.num_samples, self.seed, self.sampler = num_samples, seed, sampler
        self.raw_weights = raw_weights
        self.trajectory_samples, self.trajectory_frames = trajectory_samples, trajectory_frames
        self.dirname = dirname
        self.guidance_scale = guidance_scale  # class-conditional runs only
        self.last_path: Path | None = None
        self._raw: Tensor | None = None

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        return sample_shared(
            trainer,
            pl_module,
            self.num_samples,
            self.seed,
            sampler=self.sampler,
            guidance_scale=guidance(pl_module, self.guidance_scale),
        )

    def _grid(self, pl_module: L.LightningModule, images: Tensor) -> np.ndarray:
        """One row per class for a class-conditional model (sample i has class i % C)."""
        return class_grid(to_uint8(images), pl_module.labels_for(range(len(images)), None))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raw = None
        has_ema = any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)
        if self.raw_weights and has_ema and not trainer.sanity_checking:
            self._raw = self._draw(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        ema = self._draw(trainer, pl_module)
        strip = self._trajectory(pl_module) if self.trajectory_samples else None
        if not trainer.is_global_zero:
            return
        step, out = trainer.global_step, _run_dir(trainer) / self.dirname
        grid = self._grid(pl_module, ema)
        self.last_path = save_png(
            grid, out / f"grid_epoch={trainer.current_epoch:04d}_step={step:07d}.png"
        )
        log_image(trainer.loggers, "samples/grid_ema", grid, step)
        if self._raw is not None:
            pair = side_by_side([grid, self._grid(pl_module, self._raw)])
            save_png(pair, out / f"ema_vs_raw_step={step:07d}.png")
            log_image(trainer.loggers, "samples/ema_vs_raw", pair, step)
        if strip is not None:
            save_png(strip, out / f"trajectory_step={step:07d}.png")
            log_image(trainer.loggers, "samples/trajectory", strip, step)

    def _trajectory(self, pl_module: L.LightningModule) -> np.ndarray:
        """Rows: samples; columns: x_t at evenly spaced t from T-1 down to 0, then x_0."""
        num_timesteps = pl_module.schedule.num_timesteps
        targets = (
            torch.linspace(num_timesteps - 1, 0, self.trajectory_frames).round().long().tolist()
        )
        frames: list[Tensor] = []

        def record(t: int, x_t: Tensor, x0: Tensor) -> None:
            # keep x_t at the first visited step at or below each target timestep
            while len(frames) < len(targets) and t <= targets[len(frames)]:
                frames.append(x_t.clamp(-1, 1))

        final = pl_module.sample(
            self.trajectory_samples,
            seed=self.seed,
            sampler=self.sampler,
            on_step=record,
            guidance_scale=guidance(pl_module, self.guidance_scale),
        )
        frames = [*frames, final]
        strip = torch.stack(frames, dim=1)  # [B, frames + 1, C, H, W]
        return make_grid(to_uint8(strip.flatten(0, 1)), nrow=len(frames))


class LossByTimestep(L.Callback):
    """Validation loss split into ``num_buckets`` equal ranges of t: scalars
    ``val_loss_by_t/tLO-HI`` and a bar chart (``loss_by_t/step=S.png``) per validation.
    Low t is denoising fine detail; high t is inventing structure from near-pure noise."""

    def __init__(self, num_buckets: int = 10) -> None:
        if num_buckets < 1:
            raise ValueError(f"callbacks.loss_by_timestep.num_buckets={num_buckets} must be >= 1")
        self.num_buckets = num_buckets
        self._sum: Tensor | None = None
        self._count: Tensor | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sum = torch.zeros(self.num_buckets, device=pl_module.device)
        self._count = torch.zeros(self.num_buckets, device=pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, Tensor],
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        t, loss = outputs["t"], outputs["per_sample_loss"].float()
        bucket = t * self.num_buckets // pl_module.schedule.num_timesteps
        self._sum.index_add_(0, bucket, loss)
        self._count.index_add_(0, bucket, torch.ones_like(loss))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        total = trainer.strategy.reduce(self._sum, reduce_op="sum")
        count = trainer.strategy.reduce(self._count, reduce_op="sum")
        mean = total / count.clamp(min=1)
        num_timesteps = pl_module.schedule.num_timesteps
        labels = []
        for i in range(self.num_buckets):
            lo = i * num_timesteps // self.num_buckets
            hi = (i + 1) * num_timesteps // self.num_buckets - 1
            labels.append(f"{lo}-{hi}")
            if count[i] > 0:
                pl_module.log(f"val_loss_by_t/t{lo:04d}-{hi:04d}", mean[i], sync_dist=False)
        if trainer.is_global_zero:
            chart = bar_chart(
                mean.tolist(), labels, title=f"val loss by t, step {trainer.global_step}"
            )
            save_png(chart, _run_dir(trainer) / "loss_by_t" / f"step={trainer.global_step:07d}.png")
            log_image(trainer.loggers, "val/loss_by_timestep", chart, trainer.global_step)


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
        self._validations = 0
        self._name: str | None = None
        self.extractor: torch.nn.Module | None = None
        self.reference = None

    def load_extractor(self, datamodule: L.LightningDataModule) -> None:
        """Build the feature extractor now (``ddpm.cli`` calls this before training, so a
        missing Inception download fails the run at once, in one line)."""
        if self.extractor is None:
            self._name = self.feature_extractor or datamodule.feature_extractor
            self.extractor = build_feature_extractor(self._name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.reference is not None:
            return
        data = trainer.datamodule
        self.load_extractor(data)
        self.extractor.to(pl_module.device)
        _, self.reference = data_reference(
            data, self.reference_split, self._name, self.extractor, pl_module.device
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
        pl_module.log("val/kid", metrics["kid_mean"], sync_dist=False)
        pl_module.log("val/kid_std", metrics["kid_std"], sync_dist=False)
