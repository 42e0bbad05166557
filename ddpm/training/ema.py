"""EMA of the weights without a host synchronisation per step.

Lightning's ``EMAWeightAveraging`` keeps the average in torch's ``AveragedModel``, whose
``update_parameters`` tests ``n_averaged == 0`` and ``n_averaged > 0`` on a buffer that
lives on the GPU: two device-to-host reads, so two stalls of the CUDA stream, every step.
``EMA`` is the same callback with an ``AveragedModel`` that counts on the host.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class HostCountedAveragedModel(AveragedModel):
    """``AveragedModel`` with a multi-tensor ``multi_avg_fn`` that mirrors ``n_averaged``
    in a Python int: it starts at 0 and is read back from the buffer only when a
    checkpoint is loaded, never per update. Same averages, same state dict
    (``n_averaged`` is still counted on the device)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.multi_avg_fn is None:
            raise ValueError("HostCountedAveragedModel needs a multi_avg_fn (e.g. EMA's)")
        self._host_count = 0  # AveragedModel starts n_averaged at 0

    def update_parameters(self, model: nn.Module) -> None:
        ours = self._averaged_tensors(self.module)
        theirs = [
            t.detach().to(a.device)
            for a, t in zip(ours, self._averaged_tensors(model), strict=True)
        ]
        if self._host_count == 0:
            torch._foreach_copy_(ours, theirs)
        else:
            self.multi_avg_fn(ours, theirs, self.n_averaged)
        if not self.use_buffers:  # buffers follow the model, as in torch's implementation
            for b_avg, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                b_avg.detach().copy_(b_model.detach().to(b_avg.device))
        self.n_averaged += 1  # on the device, no read
        self._host_count += 1

    def _averaged_tensors(self, module: nn.Module) -> list[Tensor]:
        tensors = list(module.parameters())
        if self.use_buffers:
            tensors += list(module.buffers())
        return [t.detach() for t in tensors]

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self._host_count = int(self.n_averaged)  # one read, when a checkpoint is restored
        return result


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments, same checkpoint contents) with
    the host-counted average model, so no device read in the training hot path, and the
    update ema <- ema + (1 - decay) (w - ema) as one multi-tensor lerp instead of three
    kernels per parameter tensor."""

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)

    @property
    def state_key(self) -> str:
        return "EMAWeightAveraging"  # checkpoints written with Lightning's class still resume

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            device = self._device or pl_module.device
            self._average_model = HostCountedAveragedModel(
                model=pl_module, device=device, use_buffers=self._use_buffers, **self._kwargs
            )
