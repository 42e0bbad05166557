"""The training progress bar, reading the loss only when it redraws."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing ``train/loss`` read from the callback metrics when
    the bar refreshes (every ``refresh_rate`` steps). Lightning turns every progress-bar
    value into a Python number at every step, a host sync that stalls a GPU; the module
    therefore logs the loss for the loggers only and this bar fetches it itself."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = f"{float(loss):.3f}"
        return metrics
