"""EDM2's learned loss weighting (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 5 and Eq. 21-22 of App. B.2): a per-noise-level
uncertainty u(sigma), learned with the loss, that evens out the loss's magnitude across
noise levels (Kendall et al. 2018's multi-task weighting, made continuous in sigma)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar: sqrt(2) cos(2 pi (f x + phi)) with f ~ N(0, 1)
    and phi ~ U(0, 1) fixed at construction (EDM2's ``MPFourier``). The frequencies and
    phases are buffers, so a checkpoint carries them; they come from their own generator,
    so building this module leaves the global random state (the net's init) untouched."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        # [B] -> [B, 1] x [C] -> [B, C]
        return math.sqrt(2) * torch.cos(x.float()[:, None] * self.freqs + self.phases)


class UncertaintyWeighting(nn.Module):
    """u(sigma): a linear layer on ``channels`` Fourier features of the noise label
    c_noise = ln(sigma) / 4, as EDM2's ``logvar_fourier`` and ``logvar_linear``. Its
    weights start at 0, so training starts from the fixed weighting (u = 0).

    The loss it is trained with (EDM2, Eq. 21): L = lambda(sigma) / e^u ||D - y||^2 + u.
    For a fixed sigma this is minimal at u* = ln(lambda E||D - y||^2), where the weighted
    term equals 1: every noise level then contributes a loss of the same size."""

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(
                f"objective.weighting_channels={channels!r} must be a positive integer (EDM2: 128)"
            )
        self.fourier = FourierFeatures(channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: Tensor) -> Tensor:
        """u(sigma) [B] for sigma [B], in float32 whatever the autocast around it."""
        with torch.autocast(sigma.device.type, enabled=False):
            features = self.fourier(sigma.float().log() / 4)  # [B, channels]
            return self.linear(features).squeeze(1)  # [B, 1] -> [B]

    def loss(self, sigma: Tensor, weighted: Tensor) -> Tensor:
        """EDM2 Eq. 21 per sample [B]: ``weighted`` (lambda(sigma) ||D - y||^2, [B])
        divided by e^u(sigma), plus u(sigma)."""
        u = self(sigma)
        return weighted * torch.exp(-u) + u
