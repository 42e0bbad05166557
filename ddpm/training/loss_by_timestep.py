"""The validation loss split by timestep range: scalars and a bar chart."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from ddpm.training.draws import log_image, run_dir
from ddpm.utils.images import bar_chart, save_png


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
            save_png(chart, run_dir(trainer) / "loss_by_t" / f"step={trainer.global_step:07d}.png")
            log_image(trainer.loggers, "val/loss_by_timestep", chart, trainer.global_step)
