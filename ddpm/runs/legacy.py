"""Checkpoints written before the layered layout name their objects by the old module
paths (``ddpm.schedules.NoiseSchedule.from_name``, ``ddpm.callbacks.SampleGrid``, ...);
``upgrade_targets`` points a stored config's ``_target_`` values at the new ones, so such
checkpoints still load, sample and resume (``tests/test_legacy_checkpoints.py``)."""

from __future__ import annotations

from typing import Any

# old _target_ -> new _target_ (the layout change after commit cc6f3cb)
MOVED_TARGETS = {
    "ddpm.schedules.NoiseSchedule.from_name": "ddpm.diffusion.schedules.NoiseSchedule.from_name",
    "ddpm.objectives.DiffusionLoss": "ddpm.diffusion.objectives.DiffusionLoss",
    "ddpm.samplers.DDPMSampler": "ddpm.diffusion.samplers.DDPMSampler",
    "ddpm.samplers.DDIMSampler": "ddpm.diffusion.samplers.DDIMSampler",
    "ddpm.samplers.DPMSolverSampler": "ddpm.diffusion.samplers.DPMSolverSampler",
    "ddpm.data.ImageDataModule": "ddpm.data.datamodule.ImageDataModule",
    "ddpm.callbacks.SampleGrid": "ddpm.training.sample_grid.SampleGrid",
    "ddpm.callbacks.LossByTimestep": "ddpm.training.loss_by_timestep.LossByTimestep",
    "ddpm.callbacks.SampleQuality": "ddpm.training.sample_quality.SampleQuality",
    "ddpm.ema.EMA": "ddpm.training.ema.EMA",
    "ddpm.progress.ProgressBar": "ddpm.training.progress.ProgressBar",
    "ddpm.guards.TrainerGuard": "ddpm.training.guards.TrainerGuard",
}


def upgrade_targets(node: Any) -> Any:
    """A copy of a stored config (plain dicts and lists) with moved ``_target_`` values
    replaced by their new paths; everything else is returned as it was."""
    if isinstance(node, dict):
        out = {key: upgrade_targets(value) for key, value in node.items()}
        target = out.get("_target_")
        if isinstance(target, str) and target in MOVED_TARGETS:
            out["_target_"] = MOVED_TARGETS[target]
        return out
    if isinstance(node, list):
        return [upgrade_targets(value) for value in node]
    return node
