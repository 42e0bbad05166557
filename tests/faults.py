"""Faults injected into real training runs by the tests (through a callbacks override)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class PoisonBatches(L.Callback):
    """Fills the batch of the given (1-based) steps with NaN, so their loss is NaN."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 in self.steps:
            batch[0].fill_(torch.nan)
