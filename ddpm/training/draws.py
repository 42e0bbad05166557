"""What the drawing callbacks share: each rank draws its share of the sample indices and
the results are gathered (so no rank idles into a collective timeout while another one
samples), and pictures go to every logger that can show one."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor


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


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder the pictures go to (the Trainer's ``default_root_dir``)."""
    return Path(trainer.default_root_dir)
