"""Callbacks that draw pictures during training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from ddpm.images import make_grid, save_png, to_uint8


def log_image(loggers: list[Logger], key: str, image: np.ndarray, step: int) -> None:
    """Send a uint8 [H, W, C] picture to every logger that can show one (W&B, TensorBoard)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")


class SampleGrid(L.Callback):
    """After each validation, draw ``num_samples`` images from a fixed seed and save them
    as ``<run dir>/samples/grid_epoch=E_step=S.png`` (and to the loggers).

    It runs while the EMA weights are swapped in (``EMAWeightAveraging`` swaps them for
    the whole validation loop), so the grids show the EMA model. The same seed every time
    makes grids comparable over training. Under DDP each rank draws its share of the
    samples and rank 0 gathers them: no rank idles while another samples.
    """

    def __init__(self, num_samples: int = 64, seed: int = 0, dirname: str = "samples") -> None:
        if num_samples < 1:
            raise ValueError(f"callbacks.sample_grid.num_samples={num_samples} must be >= 1")
        self.num_samples = num_samples
        self.seed = seed
        self.dirname = dirname
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = math.ceil(self.num_samples / world)
        # Rank r draws samples r, r + world, r + 2 world, ... (padded to equal counts).
        local = pl_module.sample(range(rank, per_rank * world, world), seed=self.seed)
        gathered = pl_module.all_gather(local) if world > 1 else local[None]
        # [world, per_rank, C, H, W] -> [per_rank, world, ...] -> sample order r + world * j
        images = gathered.transpose(0, 1).reshape(-1, *local.shape[1:])[: self.num_samples]
        if not trainer.is_global_zero:
            return
        grid = make_grid(to_uint8(images))
        step = trainer.global_step
        path = (
            Path(trainer.default_root_dir)
            / self.dirname
            / (f"grid_epoch={trainer.current_epoch:04d}_step={step:07d}.png")
        )
        self.last_path = save_png(grid, path)
        log_image(trainer.loggers, "samples/grid_ema", grid, step)
