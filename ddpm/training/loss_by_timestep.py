"""The validation loss split by noise level (timestep or sigma range): scalars and a bar
chart."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from ddpm.training.draws import log_image, run_dir
from ddpm.utils.images import bar_chart, save_png


class LossByTimestep(L.Callback):
    """Validation loss split into ``num_buckets`` ranges of the noise level: equal ranges
    of t for ``DiffusionLoss`` (scalars ``val_loss_by_t/tLO-HI``, chart
    ``loss_by_t/step=S.png``), of ln(sigma) for ``EDMLoss`` (``val_loss_by_sigma/sigmaLO-HI``,
    ``loss_by_sigma/step=S.png``); the objective decides the buckets. Low noise is
    denoising fine detail; high noise is inventing structure from near-pure noise."""

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
        level, loss = outputs["level"], outputs["per_sample_loss"].float()
        bucket = pl_module.objective.bucket(level, self.num_buckets, pl_module.schedule)
        self._sum.index_add_(0, bucket, loss)
        self._count.index_add_(0, bucket, torch.ones_like(loss))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        total = trainer.strategy.reduce(self._sum, reduce_op="sum")
        count = trainer.strategy.reduce(self._count, reduce_op="sum")
        mean = total / count.clamp(min=1)
        name = pl_module.objective.level_name  # t or sigma
        labels = pl_module.objective.bucket_labels(self.num_buckets, pl_module.schedule)
        for i, label in enumerate(labels):
            if count[i] > 0:
                pl_module.log(f"val_loss_by_{name}/{name}{label}", mean[i], sync_dist=False)
        if trainer.is_global_zero:
            step = trainer.global_step
            chart = bar_chart(mean.tolist(), labels, title=f"val loss by {name}, step {step}")
            save_png(chart, run_dir(trainer) / f"loss_by_{name}" / f"step={step:07d}.png")
            log_image(
                trainer.loggers, f"val/loss_by_{'timestep' if name == 't' else name}", chart, step
            )
