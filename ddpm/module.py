"""DiffusionModule: the LightningModule that glues net, schedule, loss and sampler.

It holds no formulas: the loss is ``objective``'s, sampling is ``sampler``'s. Devices,
precision, gradient clipping and EMA belong to the Trainer and its callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ddpm.objectives import DiffusionLoss, fixed_timesteps_and_noise
from ddpm.rng import sample_generators
from ddpm.samplers import Sampler, StepHook
from ddpm.schedules import NoiseSchedule

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class DiffusionModule(L.LightningModule):
    """Trains ``net`` to denoise under ``schedule`` with ``objective``; draws with ``sampler``.

    ``config`` (the resolved run config, plain containers) is saved as the checkpoint's
    hyper-parameters, so a checkpoint alone rebuilds the model (see ``ddpm.cli``).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        objective: DiffusionLoss,
        sampler: Sampler,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        image_shape: Sequence[int] = (1, 8, 8),
        val_seed: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check = getattr(objective, "check_schedule", None)
        if check is not None:
            check(schedule)  # incompatible combinations fail here, before any training
        # Only plain values go to hparams: nn.Modules in hparams break load_from_checkpoint.
        self.save_hyperparameters(
            ignore=["net", "schedule", "objective", "sampler", "optimizer", "lr_scheduler"]
        )
        self.net = net
        self.schedule = schedule
        self.objective = objective
        self.sampler = sampler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.image_shape = tuple(image_shape)
        self.val_seed = val_seed

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(x_t, t)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss = self.objective(self.net, self.schedule, batch[0]).mean()
        # on_step logging keeps the value on the device: no host sync in the hot path.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Loss on fixed (t, noise) per image; returns per-sample losses and timesteps too
        (the loss-by-timestep chart reads them)."""
        x0, _, index = batch
        t, noise = fixed_timesteps_and_noise(
            index.cpu(), x0.shape[1:], self.schedule.num_timesteps, self.val_seed
        )
        t = t.to(x0.device)
        per_sample = self.objective(self.net, self.schedule, x0, t, noise.to(x0.device, x0.dtype))
        loss = per_sample.mean()
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x0.shape[0]
        )
        return {"loss": loss, "per_sample_loss": per_sample, "t": t}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm (before clipping) every ``log_every_n_steps``."""
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) != 0:
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            # stays on the device: Lightning reads it when it writes the logs
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    @torch.no_grad()
    def sample(
        self,
        indices: int | Sequence[int],
        seed: int = 0,
        batch_size: int | None = None,
        sampler: Sampler | None = None,
        progress: bool = False,
        on_step: StepHook | None = None,
    ) -> Tensor:
        """Draw the samples ``indices`` (an int n means 0 .. n-1) of the stream seeded by
        ``seed``: [N, C, H, W] in [-1, 1].

        Each sample has its own generator, so an image depends on (seed, index) only,
        never on the batch size or on how indices are split across processes.
        """
        indices = list(range(indices)) if isinstance(indices, int) else list(indices)
        sampler = sampler or self.sampler
        batch_size = batch_size or max(1, len(indices))
        was_training = self.net.training
        self.net.eval()
        chunks = [torch.empty(0, *self.image_shape, device=self.device)]
        try:
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                x = sampler.sample(
                    self.net,
                    self.schedule,
                    (len(batch), *self.image_shape),
                    prediction_type=self.objective.prediction_type,
                    generator=sample_generators(seed, batch),
                    progress=progress,
                    on_step=on_step,
                )
                chunks.append(x.clamp(-1.0, 1.0))
        finally:
            self.net.train(was_training)
        return torch.cat(chunks)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
