"""Samplers, one file per family; each turns a trained denoiser into images with the same
``sample(model, schedule, shape, prediction_type=..., generator=..., progress=...)`` call."""

from ddpm.diffusion.samplers.base import Move, Sampler, StepHook, TimestepSampler
from ddpm.diffusion.samplers.ddim import DDIMSampler
from ddpm.diffusion.samplers.ddpm import DDPMSampler
from ddpm.diffusion.samplers.dpm_solver import DPMSolverSampler
from ddpm.diffusion.samplers.edm import EDMSampler
from ddpm.diffusion.samplers.flow import FlowSampler

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EDMSampler",
    "FlowSampler",
    "Move",
    "Sampler",
    "StepHook",
    "TimestepSampler",
]
