"""ddpm: denoising diffusion probabilistic models on PyTorch Lightning and Hydra.

The public API, stable from one version to the next::

    from ddpm import NoiseSchedule, DDPMSampler, DDIMSampler, DPMSolverSampler, EDMSampler
    from ddpm import DiffusionModule, UNet, ImageDataModule

Each name is imported from its layer on first use, so ``import ddpm.diffusion`` (pure
torch) does not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module of its layer that defines it
_API = {
    "NoiseSchedule": "ddpm.diffusion.schedules",
    "DDPMSampler": "ddpm.diffusion.samplers",
    "DDIMSampler": "ddpm.diffusion.samplers",
    "DPMSolverSampler": "ddpm.diffusion.samplers",
    "EDMSampler": "ddpm.diffusion.samplers",
    "FlowSampler": "ddpm.diffusion.samplers",
    "FlowLoss": "ddpm.diffusion.flow",
    "DiT": "ddpm.nets.dit",
    "UNet": "ddpm.nets.unet",
    "ImageDataModule": "ddpm.data.datamodule",
    "DiffusionModule": "ddpm.training.module",
}
__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DiT",
    "DiffusionModule",
    "EDMSampler",
    "FlowLoss",
    "FlowSampler",
    "ImageDataModule",
    "NoiseSchedule",
    "UNet",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from ddpm.data.datamodule import ImageDataModule
    from ddpm.diffusion.flow import FlowLoss
    from ddpm.diffusion.samplers import (
        DDIMSampler,
        DDPMSampler,
        DPMSolverSampler,
        EDMSampler,
        FlowSampler,
    )
    from ddpm.diffusion.schedules import NoiseSchedule
    from ddpm.nets.dit import DiT
    from ddpm.nets.unet import UNet
    from ddpm.training.module import DiffusionModule


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
