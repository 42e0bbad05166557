"""DDIM (Song et al. 2021): the deterministic (or eta-stochastic) sampler and its inversion."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion.guidance import Model, guided_output
from ddpm.diffusion.samplers.base import Move, TimestepSampler, check_prediction_type
from ddpm.diffusion.schedules import NoiseSchedule


class DDIMSampler(TimestepSampler):
    """DDIM (Song et al. 2021), Eq. 12:

    x_{t-1} = sqrt(abar_{t-1}) x0_theta + sqrt(1 - abar_{t-1} - sigma_t^2) eps_theta
              + sigma_t z,
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
    (Eq. 16). eta = 0 is the deterministic sampler; eta = 1 is DDPM with the posterior
    variance beta~ (fixed_small) and, over all T steps, samples the same distribution.
    """

    name = "ddim"

    def __init__(
        self,
        steps: int | None = 50,
        eta: float = 0.0,
        spacing: str = "trailing",
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
        min_log_snr: float | None = -5.1,
    ) -> None:
        super().__init__(steps, spacing, clip_denoised, dynamic_threshold, min_log_snr)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"sampler.eta={eta!r} must lie in [0, 1] (0: deterministic DDIM)")
        self.eta = float(eta)

    def step(self, x: Tensor, x0: Tensor, eps: Tensor, move: Move) -> Tensor:
        abar_t, abar_prev = move.abar_t, move.abar_prev
        # sigma_t of Song et al. 2021, Eq. 16
        var = self.eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        # direction pointing to x_t (Eq. 12); max() guards float round-off at eta = 1
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - var, 0.0)) * eps
        if var > 0 and not move.last:
            x = x + math.sqrt(var) * move.noise()
        return x

    @torch.no_grad()
    def invert(
        self,
        model: Model,
        schedule: NoiseSchedule,
        x0: Tensor,
        prediction_type: str = "epsilon",
        progress: bool = False,
        y: Tensor | None = None,
        guidance_scale: float = 0.0,
    ) -> Tensor:
        """DDIM inversion: run the deterministic (eta = 0) DDIM ODE forwards, clean x_0 ->
        x_T, over this sampler's timesteps in ascending order (Song et al. 2021, Sec. 4.3;
        Dhariwal & Nichol 2021, App. F). Each step evaluates the network at the current
        x and the *target* timestep (eps(x_{t_i}, t_{i+1}) ~ eps(x_{t_{i+1}}, t_{i+1})), the
        approximation that makes ``sample(x_T=invert(x0))`` return x0 up to O(step size).
        No clipping, so the map stays invertible.
        """
        check_prediction_type(prediction_type, schedule)
        abar = schedule.alphas_cumprod.double().tolist()
        x = x0.to(schedule.betas.device, torch.float32)
        abar_cur = 1.0  # the clean sample
        for step in tqdm(
            self.timesteps(schedule, prediction_type)[::-1],
            desc="ddim inversion",
            disable=not progress,
            leave=False,
        ):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            out = guided_output(model, x, t, y, guidance_scale).float()
            _, eps = schedule.predict_x0_eps(x, t, out, prediction_type)
            # x_0 implied by the current point and eps (Ho et al. Eq. 4), then Eq. 12 with
            # sigma = 0 towards the next, noisier timestep
            x0_hat = (x - math.sqrt(1 - abar_cur) * eps) / math.sqrt(abar_cur)
            x = math.sqrt(abar[step]) * x0_hat + math.sqrt(1 - abar[step]) * eps
            abar_cur = abar[step]
        return x
