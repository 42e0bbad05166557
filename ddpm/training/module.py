"""DiffusionModule: the LightningModule that glues net, schedule, loss and sampler.

It holds no formulas: the loss is ``objective``'s, sampling is ``sampler``'s. Devices,
precision, gradient clipping and EMA belong to the Trainer and its callbacks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from ddpm.data.augment import AugmentPipe
from ddpm.diffusion.flow import FlowLoss
from ddpm.diffusion.guidance import AutoGuided
from ddpm.diffusion.objectives import DiffusionLoss, EDMLoss
from ddpm.diffusion.rng import sample_generators, step_seed
from ddpm.diffusion.samplers import Sampler, StepHook
from ddpm.diffusion.schedules import NoiseSchedule

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class DiffusionModule(L.LightningModule):
    """Trains ``net`` to denoise under ``schedule`` with ``objective``; draws with ``sampler``.

    ``objective`` is ``DiffusionLoss`` (Ho et al.'s discrete-time loss), ``EDMLoss``
    (Karras et al.'s preconditioned denoiser) or ``FlowLoss`` (flow matching); the
    samplers call what its ``sampling_model`` makes of the net. ``augment`` (non-leaky
    augmentation) transforms the training images and hands its labels to the net.

    ``config`` (the resolved run config, plain containers) is saved as the checkpoint's
    hyper-parameters, so a checkpoint alone rebuilds the model
    (``ddpm.runs.build.load_module``).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        objective: DiffusionLoss | EDMLoss | FlowLoss,
        sampler: Sampler,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        image_shape: Sequence[int] = (1, 8, 8),
        val_seed: int = 0,
        config: dict[str, Any] | None = None,
        train_seed: int = 0,
        compile: bool = False,
        channels_last: bool = False,
        compile_backend: str = "inductor",
        augment: AugmentPipe | None = None,
    ) -> None:
        super().__init__()
        check = getattr(objective, "check_schedule", None)
        if check is not None:
            check(schedule)  # incompatible combinations fail here, before any training
        sampler.check_objective(objective)
        # Only plain values go to hparams: nn.Modules in hparams break load_from_checkpoint.
        self.save_hyperparameters(
            ignore=[
                "net",
                "schedule",
                "objective",
                "sampler",
                "optimizer",
                "lr_scheduler",
                "augment",
            ]
        )
        self.net = net
        self.schedule = schedule
        self.objective = objective
        # EDM2's learned u(sigma) (objective.learned_weighting=true): a submodule, so it is
        # optimised, moved, averaged and saved with the net (None otherwise)
        self.loss_weighting = getattr(objective, "uncertainty", None)
        self.sampler = sampler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.augment = augment
        self.image_shape = tuple(image_shape)
        self.val_seed = val_seed
        self.train_seed = train_seed
        self._seeded_step = (-1, 0)  # (global step, micro-batch) last seeded
        self.compile_net = bool(compile)  # not `compile`: that is nn.Module.compile()
        self.compile_backend = compile_backend
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # NHWC conv weights: convolutions then return channels-last activations, so
            # the whole net (and the copies EMA makes of it) runs in that layout.
            self.net.to(memory_format=torch.channels_last)

    def train_net(self) -> nn.Module:
        """The net the training loss calls: ``self.net``, or with ``compile=True`` its
        ``torch.compile`` wrapper, built on first use. The wrapper is kept out of the module
        tree (no ``_orig_mod.`` keys in checkpoints: they load without compile) and is made
        after the EMA callback copied the module, so the copy never calls the live net."""
        if not self.compile_net:
            return self.net
        compiled = self.__dict__.get("_compiled_net")
        if compiled is None:
            # one graph per batch shape
            compiled = torch.compile(self.net, dynamic=False, backend=self.compile_backend)
            self.__dict__["_compiled_net"] = compiled  # plain attribute, not a submodule
        return compiled

    @property
    def num_classes(self) -> int:
        """Number of classes of a class-conditional net; 0 when unconditional."""
        return int(getattr(self.net, "num_classes", 0))

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x_t, t) if y is None else self.net(x_t, t, y=y)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Before each training batch, reseed the global generators from (train_seed, step,
        rank): the batch's flips, noise, timesteps, label dropout and network dropout are
        then a function of the step alone, so resuming at step N redraws them exactly."""
        trainer = self._trainer
        if trainer is not None and trainer.training:
            step, micro = self._seeded_step
            micro = micro + 1 if step == trainer.global_step else 0  # gradient accumulation
            self._seeded_step = (trainer.global_step, micro)
            torch.manual_seed(
                step_seed(self.train_seed, trainer.global_step, trainer.global_rank, micro)
            )
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the W&B run id, so a resumed run logs to the same W&B run."""
        trainer = self._trainer
        for logger in trainer.loggers if trainer is not None else []:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint.setdefault("logger_run_ids", {})["wandb"] = str(logger.version)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x0, y = batch[0], (batch[1] if self.num_classes else None)
        aug = None
        if self.augment is not None:
            x0, aug = self.augment(x0)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        level = noise = None
        trainer = self._trainer
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        if accumulate > 1:  # this micro-batch's share of the whole step's draws
            level, noise = self._step_draws(x0, (self._seeded_step[1], accumulate))
        net = self.train_net()
        loss = self.objective(net, self.schedule, x0, level, noise, y=y, aug=aug).mean()
        # Kept on the device; not a progress-bar value, which Lightning would turn into a
        # Python number (a host sync) at every step: ddpm.training.progress.ProgressBar shows it.
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def _step_draws(self, x0: Tensor, share: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Under gradient accumulation: the noise levels and noise of micro-batch ``share``
        = (i, k), drawn for the whole step from the step's seed (micro-batch 0's) and
        sliced, so k micro-batches of B train exactly as one batch of k x B would. The
        other draws (flips, label dropout, network dropout) stay per micro-batch."""
        trainer = self._trainer
        devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.train_seed, trainer.global_step, trainer.global_rank))
            return self.objective.draw(x0, self.schedule, share)

    def logs_this_step(self) -> bool:
        """Whether the loggers write at this step (every ``log_every_n_steps``): values
        that cost work to compute are logged only then."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Loss on a fixed noise level (t or sigma) and noise per image; returns per-sample
        losses and levels too (the loss-by-noise-level chart reads them)."""
        x0, labels, index = batch
        level, noise = self.objective.fixed_levels(
            index.cpu(), x0.shape[1:], self.schedule, self.val_seed
        )
        level = level.to(x0.device)
        y = labels if self.num_classes else None
        per_sample = self.objective(
            self.net,
            self.schedule,
            x0,
            level,
            noise.to(x0.device, x0.dtype),
            y=y,
            drop_labels=False,
        )
        loss = per_sample.mean()
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x0.shape[0]
        )
        return {"loss": loss, "per_sample_loss": per_sample, "level": level}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm (before clipping) when the loggers write."""
        if not self.logs_this_step():
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
        labels: int | Sequence[int] | None = None,
        guidance_scale: float = 0.0,
        guide: DiffusionModule | None = None,
        guide_weight: float = 1.0,
    ) -> Tensor:
        """Draw the samples ``indices`` (an int n means 0 .. n-1) of the stream seeded by
        ``seed``: [N, C, H, W] in [-1, 1].

        Each sample has its own generator, so an image depends on (seed, index) only,
        never on the batch size or on how indices are split across processes. A
        class-conditional model draws class ``labels`` (one int for all, one per index, or
        None: index % num_classes, class-balanced) with classifier-free ``guidance_scale``.
        """
        indices = list(range(indices)) if isinstance(indices, int) else list(indices)
        label_list = self.labels_for(indices, labels, guidance_scale)
        sampler = sampler or self.sampler
        model = self.objective.sampling_model(self.net, self.schedule)
        if guide is not None and guide_weight != 1.0:
            weak = guide.objective.sampling_model(guide.net, guide.schedule)
            model = AutoGuided(model, weak, guide_weight)
            guide.net.eval()  # a guide is only ever sampled
        batch_size = batch_size or max(1, len(indices))
        was_training = self.net.training
        self.net.eval()
        chunks = [torch.empty(0, *self.image_shape, device=self.device)]
        try:
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                y = (
                    torch.tensor(label_list[start : start + batch_size], device=self.device)
                    if label_list is not None
                    else None
                )
                x = sampler.sample(
                    model,
                    self.schedule,
                    (len(batch), *self.image_shape),
                    prediction_type=self.objective.prediction_type,
                    generator=sample_generators(seed, batch),
                    progress=progress,
                    on_step=on_step,
                    y=y,
                    guidance_scale=guidance_scale,
                )
                chunks.append(x.clamp(-1.0, 1.0))
        finally:
            self.net.train(was_training)
        return torch.cat(chunks)

    def labels_for(
        self,
        indices: Sequence[int],
        labels: int | Sequence[int] | None,
        guidance_scale: float = 0.0,
    ) -> list[int] | None:
        """The class label of each sample index (None for an unconditional model); refuses
        labels or guidance the model cannot take, and labels out of range."""
        if not self.num_classes:
            if labels is not None or guidance_scale:
                raise ValueError(
                    "this checkpoint is unconditional (trained without data.conditional=true): "
                    "drop class_label and guidance_scale"
                )
            return None
        if labels is None:
            return [i % self.num_classes for i in indices]
        out = [int(labels)] * len(indices) if isinstance(labels, int) else [int(v) for v in labels]
        if len(out) != len(indices):
            raise ValueError(f"got {len(out)} labels for {len(indices)} samples")
        bad = [v for v in out if not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(
                f"class_label={bad[0]} is out of range: this checkpoint has {self.num_classes} "
                f"classes (0..{self.num_classes - 1})"
            )
        return out

    def configure_optimizers(self) -> Any:
        params = list(self.net.parameters())
        if self.loss_weighting is not None:
            params += list(self.loss_weighting.parameters())
        optimizer = self.optimizer_factory(params=params)
        if self.lr_scheduler_factory is None:
            return optimizer
        factory = self.lr_scheduler_factory
        keywords = getattr(factory, "keywords", {})
        if "total_steps" in keywords and keywords["total_steps"] is None:
            # null: this run's trainer.max_steps, read now, so that a resumed run given a
            # larger max_steps decays over it
            factory = functools.partial(factory, total_steps=self.trainer.max_steps)
        scheduler = factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
