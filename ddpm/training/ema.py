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
        ours, ours_copied = self._split(self.module)
        theirs, theirs_copied = self._split(model)
        theirs = [t.to(a.device) for a, t in zip(ours, theirs, strict=True)]
        self._average(ours, theirs)
        for avg, model_tensor in zip(ours_copied, theirs_copied, strict=True):
            avg.copy_(model_tensor.to(avg.device))
        self.n_averaged += 1  # on the device, no read
        self._host_count += 1

    def _average(self, ours: list[Tensor], theirs: list[Tensor]) -> None:
        """Fold the model's tensors ``theirs`` into the averages ``ours`` (in place); the
        first update copies them."""
        if self._host_count == 0:
            torch._foreach_copy_(ours, theirs)
        else:
            self.multi_avg_fn(ours, theirs, self.n_averaged)

    def _split(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(averaged, copied) tensors of ``module``. Parameters are averaged; buffers too
        when ``use_buffers``, except those an average means nothing for, e.g. BatchNorm's
        integer ``num_batches_tracked`` (no lerp of integers): those are copied from the
        model, as every buffer is without ``use_buffers`` (torch's AveragedModel)."""
        averaged = [p.detach() for p in module.parameters()]
        copied = []
        for buffer in module.buffers():
            floating = buffer.is_floating_point() or buffer.is_complex()
            (averaged if self.use_buffers and floating else copied).append(buffer.detach())
        return averaged, copied

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self._host_count = int(self.n_averaged)  # one read, when a checkpoint is restored
        return result


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments, same checkpoint contents) with
    the host-counted average model, so no device read in the training hot path, and the
    update ema <- ema + (1 - decay) (w - ema) as one multi-tensor lerp instead of three
    kernels per parameter tensor.

    Every checkpoint stores the raw (trained) weights as ``current_model_state``, wherever
    they are when it is written. Lightning's class takes them from the module, which holds
    the average while it is swapped in for validation and after ``on_train_end`` has copied
    it in; a ``last.ckpt`` that ModelCheckpoint writes at train end then stored the average
    twice, and a resumed run continued from it. Here the raw weights are kept aside at
    train end, and a save reads them from wherever they are.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)
        self._swapped = False  # the module holds the average, the average model the raw
        self._raw_at_end: dict[str, Tensor] | None = None  # raw weights after on_train_end

    @property
    def state_key(self) -> str:
        return "EMAWeightAveraging"  # checkpoints written with Lightning's class still resume

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = self._make_average_model(
                pl_module, self._device or pl_module.device
            )
            self._swapped = False
            self._raw_at_end = None

    def _make_average_model(
        self, pl_module: L.LightningModule, device: torch.device | str
    ) -> HostCountedAveragedModel:
        """The averaged copy of ``pl_module`` that ``setup`` builds for a fit."""
        return HostCountedAveragedModel(
            model=pl_module, device=device, use_buffers=self._use_buffers, **self._kwargs
        )

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is None:
            return
        raw = self._raw_state(pl_module, pl_module.state_dict())
        self._raw_at_end = {name: value.detach().clone() for name, value in raw.items()}
        super().on_train_end(trainer, pl_module)  # the module takes the average, as in Lightning

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        raw = None
        if self._average_model is not None:
            raw = self._raw_state(pl_module, checkpoint["state_dict"])
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if raw is not None:
            checkpoint["current_model_state"] = raw

    def _raw_state(
        self, pl_module: L.LightningModule, module_state: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The raw weights, keyed as the module's state dict: kept aside after train end,
        in the average model while swapped (validation), else the module's own."""
        if self._raw_at_end is not None:
            return self._raw_at_end
        if self._swapped:
            assert self._average_model is not None
            return self._average_model.module.state_dict()
        return module_state
