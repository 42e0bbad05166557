"""Power-function EMA with snapshots for post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3).

``ema=power`` tracks one EMA per relative std in ``stds``; the first one is the average
the run validates, draws grids and FID with and saves as the checkpoint's ``state_dict``
(as ``ema=standard``'s single EMA). Every ``snapshot_every`` optimizer steps, and when
training ends, each tracked average is written to ``dirpath`` as
``step=0001000-std=0.050.pt``; ``ddpm.training.posthoc_ema.reconstruct`` builds the EMA
of any other length from those files after training (``sample.py ema_std=...``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ddpm.training.ema import EMA, HostCountedAveragedModel
from ddpm.training.posthoc_ema import (
    check_sigma_rel,
    power_beta,
    sigma_rel_to_gamma,
    snapshot_path,
)
from ddpm.utils.files import atomic_torch_save

log = logging.getLogger(__name__)
SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PowerAveragedModel(HostCountedAveragedModel):
    """Averages of the model with power-function profiles, one per exponent in ``gammas``.

    The first is this ``AveragedModel``'s own module (swapped in for validation); the
    others are plain tensor lists beside it, in the same order as ``_split``'s averaged
    tensors. EDM2 Algorithm 1: at update t (1-based, one per optimizer step),
    avg <- beta avg + (1 - beta) w with beta = (1 - 1/t)^(gamma + 1); t = 1 copies."""

    def __init__(self, model: nn.Module, gammas: list[float], **kwargs: Any) -> None:
        super().__init__(model=model, multi_avg_fn=_unused_multi_avg_fn, **kwargs)
        self.gammas = list(gammas)
        ours, _ = self._split(self.module)
        self.others = [[t.clone() for t in ours] for _ in self.gammas[1:]]

    def _average(self, ours: list[Tensor], theirs: list[Tensor]) -> None:
        step = self._host_count + 1  # this update's t: the host count is t - 1
        for gamma, averages in zip(self.gammas, [ours, *self.others], strict=True):
            if step == 1:
                torch._foreach_copy_(averages, theirs)
            else:  # avg + (1 - beta) (w - avg) = beta avg + (1 - beta) w, one kernel
                torch._foreach_lerp_(averages, theirs, 1.0 - power_beta(gamma, step))

    def averaged_names(self) -> list[str]:
        """State-dict names of the averaged tensors, in ``_split``'s order."""
        names = [name for name, _ in self.module.named_parameters()]
        if self.use_buffers:
            names += [
                name
                for name, b in self.module.named_buffers()
                if b.is_floating_point() or b.is_complex()
            ]
        return names

    def tracked(self) -> list[list[Tensor]]:
        """Every tracked average's tensors, the first (the module's) first."""
        return [self._split(self.module)[0], *self.others]


def _unused_multi_avg_fn(*args: Any) -> None:  # AveragedModel needs one; _average is used
    raise AssertionError("PowerAveragedModel averages in _average")


class PowerEMA(EMA):
    """``ema=power``: power-function EMAs of lengths ``stds`` (relative stds, EDM2's
    sigma_rel), snapshots for post-hoc reconstruction, exact resume (the other averages
    are saved in the callback's checkpoint state). t counts optimizer steps, so the
    profiles do not depend on the batch size's unit; there is no warm-up setting."""

    def __init__(
        self,
        stds: Sequence[float] | float = (0.15, 0.05),
        snapshot_every: int = 500,
        snapshot_dtype: str = "float32",
        dirpath: str | None = None,
        use_buffers: bool = False,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "decay" in kwargs:
            raise ValueError(
                "callbacks.ema.decay belongs to ema=standard; ema=power takes "
                "callbacks.ema.stds (relative stds, e.g. [0.15,0.05]): give ema=standard, "
                "or drop the decay with ~callbacks.ema.decay"
            )
        if kwargs:
            raise ValueError(f"ema=power has no setting {sorted(kwargs)[0]!r}")
        if isinstance(stds, (int, float)):
            stds = [stds]
        if isinstance(stds, str) or not isinstance(stds, Sequence) or len(stds) == 0:
            raise ValueError("callbacks.ema.stds must list at least one std, e.g. [0.15,0.05]")
        self.stds = [check_sigma_rel(s, "callbacks.ema.stds") for s in stds]
        if len({f"{s:.3f}" for s in self.stds}) != len(self.stds):
            raise ValueError(f"callbacks.ema.stds={stds} repeats a std (to 3 decimals)")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int):
            snapshot_every = -1
        if snapshot_every < 1:
            raise ValueError("callbacks.ema.snapshot_every must be an integer >= 1 (steps)")
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(
                f"callbacks.ema.snapshot_dtype={snapshot_dtype!r} is not one of "
                f"{', '.join(SNAPSHOT_DTYPES)}"
            )
        super().__init__(decay=0.0, use_buffers=use_buffers, device=device)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.stds]
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = SNAPSHOT_DTYPES[snapshot_dtype]
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._last_snapshot = -1

    @property
    def state_key(self) -> str:
        return "PowerEMA"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "ema_snapshots"

    def _make_average_model(
        self, pl_module: L.LightningModule, device: torch.device | str
    ) -> PowerAveragedModel:
        return PowerAveragedModel(
            pl_module, self.gammas, device=device, use_buffers=self._use_buffers
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        step = trainer.global_step
        # step > 0: under gradient accumulation the micro-batches before the first
        # optimizer step end at global step 0, with no update made
        if 0 < step == self._latest_update_step and step % self.snapshot_every == 0:
            self._write_snapshots(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and self._latest_update_step > 0:
            self._write_snapshots(trainer, self._latest_update_step)
        super().on_train_end(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Lightning restores the first average; a checkpoint without this callback's state
        (trained with ema=standard or without EMA, given as ckpt_path) has none of the
        others, so they start from that average too (``load_state_dict``, which Lightning
        calls after this, overwrites them when the state is there)."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        model = self._average_model
        if model is not None and self.state_key not in checkpoint.get("callbacks", {}):
            first = model.tracked()[0]
            for tensors in model.others:
                torch._foreach_copy_(tensors, first)
            if model.others:
                log.warning(
                    "the checkpoint has no power-EMA state: every tracked EMA starts from "
                    "its EMA weights (or its weights, without EMA)"
                )

    def _write_snapshots(self, trainer: L.Trainer, step: int) -> None:
        """One file per tracked std at ``step`` (rank 0 only; atomic, like checkpoints)."""
        if step == self._last_snapshot or not trainer.is_global_zero:
            return
        assert self._average_model is not None and self.dirpath is not None
        names = self._average_model.averaged_names()
        for std, gamma, tensors in zip(
            self.stds, self.gammas, self._average_model.tracked(), strict=True
        ):
            state = {
                n: t.detach().to("cpu", self.snapshot_dtype)
                for n, t in zip(names, tensors, strict=True)
            }
            record = {"step": step, "std": std, "gamma": gamma, "state_dict": state}
            atomic_torch_save(record, snapshot_path(self.dirpath, step, std))
        self._last_snapshot = step

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stds"] = list(self.stds)
        if self._average_model is not None:
            names = self._average_model.averaged_names()
            state["others"] = [
                dict(zip(names, [t.detach().clone() for t in avg], strict=True))
                for avg in self._average_model.others
            ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        stored = [float(s) for s in state_dict.get("stds", [])]
        if stored != self.stds:
            raise ValueError(
                f"callbacks.ema.stds={self.stds} but the checkpoint tracked {stored}: "
                "a resumed power EMA keeps its stds"
            )
        if self._average_model is None:  # not a fit (as Lightning's average is not restored)
            return
        names = self._average_model.averaged_names()
        others = state_dict.get("others", [])
        for tensors, stored in zip(self._average_model.others, others, strict=True):
            for tensor, name in zip(tensors, names, strict=True):
                tensor.copy_(stored[name])
