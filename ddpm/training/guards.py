"""TrainerGuard: a run survives interruption and divergence.

- SIGINT and SIGTERM: the step in progress finishes, a checkpoint is written (atomically,
  see ``ddpm.runs.checkpoints``) to ``checkpoints/last.ckpt`` and training stops; a second
  signal stops at once. Under DDP the ranks agree on the stop step (an all-reduce every
  ``check_every_n_steps``), so every rank takes part in the same save. SLURM's requeue
  signal stays with Lightning (``hpc_ckpt_*.ckpt`` and ``scontrol requeue``).
- Non-finite losses are flagged on the device (no host sync per step) and read every
  ``check_every_n_steps``, before every validation and before every checkpoint write.
  ``nonfinite="stop"`` stops with the step and the last good checkpoint; ``"skip"`` has the
  fused optimizer skip the update on the device (its ``found_inf`` input, the mechanism
  GradScaler uses) and logs the count as ``train/skipped_steps``.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """Training ended early on purpose; ``exit_code`` is what the process should return."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainerGuard(L.Callback):
    """Saves and stops on SIGINT/SIGTERM; stops on (or skips) non-finite losses."""

    def __init__(self, nonfinite: str = "stop", check_every_n_steps: int = 25) -> None:
        if nonfinite not in POLICIES:
            raise ValueError(
                f"trainer_guard.nonfinite={nonfinite!r} is unknown; choose one of {POLICIES}"
            )
        if int(check_every_n_steps) < 1:
            raise ValueError(
                f"trainer_guard.check_every_n_steps={check_every_n_steps} must be >= 1"
            )
        self.nonfinite, self.check_every = nonfinite, int(check_every_n_steps)
        self.signal_received: int | None = None  # set by the handler (host-side, free to read)
        self.interrupted_at: tuple[int, Path] | None = None  # (step, checkpoint) once saved
        self._handlers: dict[int, Any] = {}
        self._first_bad: Tensor | None = None  # step of the first non-finite loss, or -1
        self._bad_value: Tensor | None = None
        self._loss_bad: Tensor | None = None
        self._skipped: Tensor | None = None
        self._restored_skipped = 0
        self._last_saved_step: int | None = None

    # ---- signals ---------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers (after Lightning's own, which only notify under DDP)."""
        from threading import current_thread, main_thread

        if current_thread() is not main_thread():
            return
        for signum in SIGNALS:
            self._handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        # With these handlers in place Lightning's own SIGTERM flag is never set, yet under
        # DDP its loop broadcasts that flag and reads it back (a host sync) at every step;
        # the ranks agree on signals here instead, every check_every_n_steps.
        loop = trainer.fit_loop.epoch_loop
        if trainer.world_size > 1 and hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _skip_lightning_sigterm_broadcast

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_received is not None:  # the second one: stop now
            self._restore_handlers()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Lightning shuts down on it
            signal.signal(signum, signal.SIG_DFL)  # not Lightning's handler: it only notes it
            signal.raise_signal(signum)
            return
        self.signal_received = signum
        log.warning(
            "received %s: saving a checkpoint after this step, then stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._handlers = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)

    def _should_stop_for_signal(self, trainer: L.Trainer) -> bool:
        if trainer.world_size == 1 or not dist.is_initialized():
            return self.signal_received is not None
        if trainer.global_step % self.check_every != 0:
            return False
        flag = torch.tensor(
            [0 if self.signal_received is None else self.signal_received],
            device=trainer.strategy.root_device,
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank signalled: all stop here
        if flag.item() and self.signal_received is None:
            self.signal_received = int(flag.item())
        return bool(flag.item())

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        path = _save_last(trainer)
        trainer.should_stop = True
        self.interrupted_at = (trainer.global_step, path)

    # ---- non-finite losses -----------------------------------------------------------

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first_bad is None:
            device = pl_module.device
            self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
            self._bad_value = torch.zeros((), device=device)
            self._skipped = torch.full((), self._restored_skipped, device=device)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        self._loss_bad = ~torch.isfinite(loss.detach())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.nonfinite != "skip" or self._loss_bad is None:
            return
        if str(trainer.precision).startswith("16"):
            return  # GradScaler already skips steps with non-finite gradients
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        bad = self._loss_bad
        if grads:  # one fused pass over the gradients; the result stays on the device
            bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        # A fused optimizer skips its update (and its step count) where found_inf != 0.
        optimizer.found_inf = bad.float()
        optimizer.grad_scale = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for optimizer in trainer.optimizers:  # no stale flag survives into the next step
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        if self._loss_bad is not None and self._first_bad is not None:
            step = trainer.global_step  # 1-based: the step just taken (or skipped)
            new = self._loss_bad & (self._first_bad < 0)
            self._first_bad = torch.where(new, step, self._first_bad)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self._bad_value = torch.where(new, loss.detach().float(), self._bad_value)
            if self.nonfinite == "skip":
                self._skipped = self._skipped + self._loss_bad.long()
                pl_module.log("train/skipped_steps", self._skipped.float(), on_step=True)
            self._loss_bad = None
        if trainer.global_step % self.check_every == 0:
            self.check_finite(trainer)
        if self._should_stop_for_signal(trainer):
            self._save_and_stop(trainer)
        elif self._is_final_step(trainer) and self._last_saved_step != trainer.global_step:
            # The final step is always saved, even when no validation falls on it; saved
            # here rather than at train end, where Lightning has already closed the epoch.
            _save_last(trainer)

    @staticmethod
    def _is_final_step(trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps

    def check_finite(self, trainer: L.Trainer) -> None:
        """Raise RunStopped if a loss was non-finite under the stop policy (a host sync)."""
        if self.nonfinite != "stop" or self._first_bad is None:
            return
        first = self._first_bad
        if trainer.world_size > 1 and dist.is_initialized():
            first = torch.where(first < 0, torch.iinfo(torch.long).max, first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.long).max, -1, first)
        step = int(first.item())
        if step < 0:
            return
        last = _last_checkpoint_path(trainer)
        if self._last_saved_step is not None and last:
            good = f"the last good checkpoint is {last} (step {self._last_saved_step})"
        else:
            good = "no checkpoint was written before it"
        raise RunStopped(
            f"non-finite loss ({float(self._bad_value):g}) at step {step}: training stopped "
            f"and nothing after it was saved; {good}. Lower optimizer.lr or check the data, "
            "or set trainer_guard.nonfinite=skip to skip such steps",
            exit_code=1,
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.check_finite(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check_finite(trainer)  # raising here means the file is never written
        self._last_saved_step = int(checkpoint.get("global_step", trainer.global_step))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def state_dict(self) -> dict[str, Any]:
        skipped = int(self._skipped.item()) if self._skipped is not None else 0
        return {"skipped_steps": skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_skipped = int(state_dict.get("skipped_steps", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad = None  # (re)created on the module's device at the first batch


def _skip_lightning_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while the guard handles signals."""


def _last_checkpoint_path(trainer: L.Trainer) -> str:
    """The checkpoint ModelCheckpoint wrote last (``last.ckpt`` when it keeps one)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            return callback.last_model_path or callback.best_model_path
    return ""


def _save_last(trainer: L.Trainer) -> Path:
    """Write ``last.ckpt`` now. ModelCheckpoint is told it is its own last checkpoint, so
    a validation in the same step overwrites it instead of writing ``last-v1.ckpt``, and
    that it has saved one: otherwise its ``on_train_end`` writes ``last.ckpt`` again, after
    Lightning has closed the epoch (a resumed run would start the next one) and the EMA
    callback has copied the average into the module."""
    path = _checkpoint_dir(trainer) / "last.ckpt"
    trainer.save_checkpoint(path, weights_only=False)
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            callback.last_model_path = str(path)
            if callback.save_last is True and not callback._last_checkpoint_saved:
                callback._last_checkpoint_saved = str(path)  # what on_train_end tests
    return path


def _checkpoint_dir(trainer: L.Trainer) -> Path:
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"
