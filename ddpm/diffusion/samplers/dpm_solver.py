"""DPM-Solver++(2M) (Lu et al. 2022), for the diffusion ODE or the reverse SDE."""

from __future__ import annotations

import math

from torch import Tensor

from ddpm.diffusion.samplers.base import Move, TimestepSampler


class DPMSolverSampler(TimestepSampler):
    """DPM-Solver++(2M), the second-order multistep solver in data prediction (Lu et al.
    2022, "DPM-Solver++", Algorithm 2), for the diffusion ODE or, with ``solver="sde"``,
    the reverse SDE: SDE-DPM-Solver++(2M) (k-diffusion's ``dpmpp_2m_sde``, diffusers'
    ``sde-dpmsolver++``), the exact solution of the SDE's linear part in data prediction
    with the same 2M correction.

    With lambda = log(alpha / sigma), h = lambda_next - lambda_t, e^{-h} = sigma_next
    alpha_t / (alpha_next sigma_t), and D = x0_theta(t) + 1/(2r) (x0_theta(t) -
    x0_theta(t_prev)), r = h_prev / h (the 2M correction):
      ode: x_next = (sigma_next / sigma_t) x_t + alpha_next (1 - e^{-h}) D
      sde: x_next = (sigma_next / sigma_t) e^{-h} x_t + alpha_next (1 - e^{-2h}) D
                    + sigma_next sqrt(1 - e^{-2h}) z
    First order (D = x0_theta) the ODE step is DDIM and the SDE step is DDPM with the
    posterior variance. The first step, the final jump to the clean sample (sigma = 0)
    and a step after an infinite h (zero terminal SNR) are first order, as in the
    reference code. Ratios replace exponentials so infinite lambdas stay finite.
    """

    name = "dpm_solver"

    def __init__(
        self,
        steps: int | None = 20,
        solver: str = "sde",
        spacing: str = "trailing",
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
        min_log_snr: float | None = -5.1,
    ) -> None:
        super().__init__(steps, spacing, clip_denoised, dynamic_threshold, min_log_snr)
        if solver not in ("ode", "sde"):
            raise ValueError(f"sampler.solver={solver!r} is unknown; choose ode or sde")
        self.solver = solver
        self._history: list[tuple[float, Tensor]] = []

    def start(self) -> None:
        self._history = []

    def step(self, x: Tensor, x0: Tensor, eps: Tensor, move: Move) -> Tensor:
        alpha_t, sigma_t = math.sqrt(move.abar_t), math.sqrt(1 - move.abar_t)
        alpha_n, sigma_n = math.sqrt(move.abar_prev), math.sqrt(1 - move.abar_prev)
        lam_t = math.log(alpha_t / sigma_t) if alpha_t > 0 else -math.inf
        d = x0
        if self._history and not move.last:
            lam_before, x0_before = self._history[-1]
            h_before = lam_t - lam_before
            if math.isfinite(h_before):
                r = h_before / (math.log(alpha_n / sigma_n) - lam_t)
                d = x0 + (x0 - x0_before) / (2 * r)
        self._history = [(lam_t, x0)]
        e_h = sigma_n * alpha_t / (alpha_n * sigma_t)  # e^{-h}, in [0, 1)
        if self.solver == "ode":
            return (sigma_n / sigma_t) * x + alpha_n * (1 - e_h) * d
        x = (sigma_n / sigma_t) * e_h * x + alpha_n * (1 - e_h**2) * d
        if not move.last:
            x = x + sigma_n * math.sqrt(1 - e_h**2) * move.noise()
        return x
