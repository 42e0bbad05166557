"""Faults and probes injected into real training runs by the tests (through a callbacks
override such as ``+callbacks.probe._target_=tests.faults.RankProbe``)."""

from __future__ import annotations

import sys
from pathlib import Path
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


class RankProbe(L.Callback):
    """Writes, per rank, what that rank starts from: its weights as built (before DDP
    could broadcast anything), and the first training batch with the timesteps the loss
    is about to draw (replayed from a copy of the generator state, which is left as is)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        params = [p.detach().flatten() for p in pl_module.parameters()]
        self.record["weights"] = torch.cat(params).clone()  # [n_params]
        # who calls torch.distributed.broadcast during the run (a per-step one is a sync)
        self.record["broadcast_callers"] = callers = []
        original = torch.distributed.broadcast

        def broadcast(*args: Any, **kwargs: Any) -> Any:
            callers.append(sys._getframe(1).f_code.co_name)
            return original(*args, **kwargs)

        torch.distributed.broadcast = broadcast

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if "batch" in self.record:
            return
        replay = torch.Generator().manual_seed(0)
        replay.set_state(torch.get_rng_state())
        num_timesteps = pl_module.schedule.num_timesteps
        self.record["batch"] = batch[0].detach().clone()
        self.record["t"] = torch.randint(0, num_timesteps, (batch[0].shape[0],), generator=replay)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


class BatchLog(L.Callback):
    """Writes, per rank, the data indices of every training batch: {step: [indices]}."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.seen[trainer.global_step] = batch[2].tolist()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.pt"
        earlier = torch.load(path) if path.is_file() else {}  # a resumed run adds its steps
        torch.save({**earlier, **self.seen}, path)


class RunOutOfMemory(L.Callback):
    """Raises what an allocation failure raises at the given (1-based) step: ``gpu``
    (torch.OutOfMemoryError) or ``host`` (the CPU allocator's RuntimeError)."""

    def __init__(self, step: int, kind: str = "gpu") -> None:
        self.step, self.kind = step, kind

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 == self.step:
            if self.kind == "gpu":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 8589934592 bytes"
            )
