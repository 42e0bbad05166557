"""Mixed precision that keeps fused optimizers and gradient clipping together.

Lightning's ``MixedPrecision`` refuses gradient clipping with a fused optimizer (it leaves
unscaling to the optimizer's step, so clipping would see scaled gradients), even under
bf16-mixed, which has no scaler at all. torch's GradScaler does support an explicit
``unscale_`` before a fused step (the step then skips its own unscaling and still skips
non-finite updates through ``found_inf``), so this plugin always unscales first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import LBFGS, Optimizer


class ClippableMixedPrecision(MixedPrecision):
    """``MixedPrecision`` (16-mixed with loss scaling, bf16-mixed without) that allows
    gradient clipping with fused optimizers."""

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: L.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        if self.scaler is None:  # bf16: nothing to unscale
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if isinstance(optimizer, LBFGS):
            raise ValueError("precision=16-mixed cannot drive LBFGS; use precision=32-true")
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:  # backward skipped
            self._after_closure(model, optimizer)
            return closure_result
        self.scaler.unscale_(optimizer)  # true gradients for clipping and logging
        self._after_closure(model, optimizer)
        out = self.scaler.step(optimizer, **kwargs)  # skips the update on inf/nan
        self.scaler.update()
        return out

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def run_device(accelerator: str) -> str:
    """The device type Lightning runs ``trainer.accelerator`` on: ``cpu`` or ``cuda``."""
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def precision_plugin(precision: str, accelerator: str) -> ClippableMixedPrecision | None:
    """The plugin for ``trainer.precision`` (None: Lightning's own handling, for full
    precision). ``accelerator`` decides the autocast device, as Lightning would."""
    if precision not in ("16-mixed", "bf16-mixed"):
        return None
    device = run_device(accelerator)
    scaler = torch.amp.GradScaler(device) if precision == "16-mixed" else None
    return ClippableMixedPrecision(precision, device, scaler)
