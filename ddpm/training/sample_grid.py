"""Sample grids during training: EMA and raw weights side by side, and denoising
trajectories."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from ddpm.diffusion.samplers.base import Sampler
from ddpm.training.draws import guidance, log_image, run_dir, sample_shared
from ddpm.utils.images import class_grid, make_grid, save_png, side_by_side, to_uint8


class SampleGrid(L.Callback):
    """After each validation: a grid of ``num_samples`` images from a fixed seed drawn with
    the EMA weights (``samples/grid_epoch=E_step=S.png``), the same seed drawn with the raw
    weights beside it (``samples/ema_vs_raw_step=S.png``), and a denoising trajectory of a
    few samples (``samples/trajectory_step=S.png``: x_t from t = T-1 down to x_0).

    ``EMAWeightAveraging`` swaps the EMA weights in for the whole validation loop and
    ``ddpm.runs.build`` puts it after this callback, so the raw weights are drawn at
    validation start and the EMA weights at validation end.
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
        step, out = trainer.global_step, run_dir(trainer) / self.dirname
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
