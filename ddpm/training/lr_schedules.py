"""Learning-rate schedules the configs name (``lr_scheduler._target_``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warm-up from ``start_factor`` to 1 over ``warmup_steps``, then cosine decay to
    ``final_factor`` at ``total_steps`` (the module passes the run's ``trainer.max_steps``
    when the config leaves it null) (Loshchilov & Hutter 2017, SGDR, Eq. 5 without
    restarts), held there after. Stepped once per optimizer step. A run shorter than its
    warm-up stays in the warm-up (as diffusers' schedulers and LinearLR do).

    The checkpoint keeps only the position, not the shape: a run continued with another
    ``total_steps`` (``ckpt_path=... trainer.max_steps=...``) follows its new config."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int | None,
        start_factor: float = 0.01,
        final_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"lr_scheduler=cosine decays over total_steps={total_steps}: set "
                "trainer.max_steps >= 1, or use lr_scheduler=constant for an epoch-bound run"
            )
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler: warmup_steps={warmup_steps} must be >= 0")
        if not (0 < start_factor <= 1 and 0 <= final_factor <= 1):
            raise ValueError(
                f"lr_scheduler: start_factor={start_factor} must lie in (0, 1] and "
                f"final_factor={final_factor} in [0, 1]"
            )
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.start_factor, self.final_factor = start_factor, final_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate after ``step`` optimizer steps."""
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        # SGDR Eq. 5: eta_min + (eta_max - eta_min) (1 + cos(pi T_cur / T_i)) / 2
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.final_factor + (1 - self.final_factor) * cosine

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        shape = ("warmup_steps", "total_steps", "start_factor", "final_factor")
        return {k: v for k, v in super().state_dict().items() if k not in shape}
