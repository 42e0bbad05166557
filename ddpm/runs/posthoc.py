"""A checkpoint's step and the post-hoc EMA (EDM2) that ``sample.py ema_std=`` and the
autoguidance guide (``guide_step=``, ``guide_ema_std=``) rebuild from a power-EMA run's
snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddpm.runs.errors import UsageError
from ddpm.training.module import DiffusionModule
from ddpm.training.posthoc_ema import list_snapshots, reconstruct


def checkpoint_step(ckpt_path: Path) -> int:
    """The checkpoint's global step (read memory-mapped: no tensor is read; load_module
    has read and checked the file)."""
    return int(
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    )


def snapshot_folder(ckpt_path: Path, config: dict[str, Any]) -> Path:
    """Where a power-EMA run's snapshots are: ``ema_snapshots`` in the checkpoint's run
    folder (RUN/checkpoints/x.ckpt -> RUN/ema_snapshots, so a moved run folder works),
    else the ``dirpath`` its config recorded."""
    beside = ckpt_path.resolve().parent.parent / "ema_snapshots"
    recorded = ((config.get("callbacks") or {}).get("ema") or {}).get("dirpath")
    if list_snapshots(beside) or recorded is None:
        return beside
    return Path(recorded)


def posthoc_ema(
    module: DiffusionModule, ckpt_path: Path, ema_std: float, step: int | None = None
) -> dict[str, Any]:
    """Load into ``module`` the EMA of length ``ema_std`` that post-hoc EMA reconstructs
    (Karras et al. 2024, Algorithm 3) from the run's snapshots up to the checkpoint's
    step (``step``, read from the file when not given); returns what was used (std,
    step, folder, number of snapshots)."""
    step = checkpoint_step(ckpt_path) if step is None else step
    folder = snapshot_folder(ckpt_path, module.hparams.config)
    state, used_step = reconstruct(folder, step, float(ema_std))
    own = module.state_dict()
    foreign = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if foreign:
        raise UsageError(
            f"the EMA snapshots in {folder} do not fit the network of {ckpt_path} "
            f"(e.g. {foreign[0]}): they come from another run"
        )
    module.load_state_dict(state, strict=False)  # the averaged tensors; buffers stay
    used = len([s for s in list_snapshots(folder) if s[0] <= used_step])
    print(
        f"post-hoc EMA: ema_std={float(ema_std)} at step {used_step} "
        f"(asked for step {step}) from {used} snapshots in {folder}"
    )
    return {
        "ema_std": float(ema_std),
        "step": used_step,
        "ckpt_step": step,
        "snapshots": used,
        "folder": str(folder),
    }
