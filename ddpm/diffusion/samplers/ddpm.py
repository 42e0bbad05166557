"""Ancestral sampling (Ho et al. 2020), respaced for fewer steps (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

from torch import Tensor

from ddpm.diffusion.samplers.base import Move, TimestepSampler


class DDPMSampler(TimestepSampler):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2).

    x_{t-1} = mu~_t(x_t, x0_theta) + sigma_t z, with mu~ the posterior mean (Eq. 7) and
    no noise at the last step. ``variance``: ``fixed_large`` sigma_t^2 = beta_t, or
    ``fixed_small`` sigma_t^2 = beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (Sec. 3.2).

    With ``steps < T`` the chain runs on a subsequence S with the respaced betas
    beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}} (Nichol & Dhariwal 2021, Sec. 4);
    ``steps=None`` uses all T steps and is exactly Algorithm 2 (with clipping off).

    ``clip_denoised`` clips the implied x_0 estimate to [-1, 1] before the posterior mean is
    formed, as Ho et al.'s reference code does (``clip_denoised=True``).
    """

    name = "ddpm"

    def __init__(
        self,
        steps: int | None = None,
        variance: str = "fixed_large",
        spacing: str = "linspace",
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
        min_log_snr: float | None = None,
    ) -> None:
        super().__init__(steps, spacing, clip_denoised, dynamic_threshold, min_log_snr)
        if variance not in ("fixed_large", "fixed_small"):
            raise ValueError(
                f"sampler.variance={variance!r} is unknown; choose fixed_large or fixed_small"
            )
        self.variance = variance

    def step(self, x: Tensor, x0: Tensor, eps: Tensor, move: Move) -> Tensor:
        abar_t, abar_prev = move.abar_t, move.abar_prev
        alpha_t = abar_t / abar_prev  # = 1 - beta_t when no step is skipped
        beta_t = 1.0 - alpha_t
        # mu~_t(x_t, x_0) (Ho et al. 2020, Eq. 7); with x0 from eps and no clipping this
        # equals Eq. 11: (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
        coef_x0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)
        coef_xt = math.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
        mean = coef_x0 * x0 + coef_xt * x
        if move.last:
            return mean
        var = beta_t if self.variance == "fixed_large" else beta_t * (1 - abar_prev) / (1 - abar_t)
        return mean + math.sqrt(var) * move.noise()
