"""The EDM sampler (Karras et al. 2022, Algorithm 2): Heun's method on the probability-flow
ODE over rho-spaced noise levels, with optional stochastic churn."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion.guidance import Model, guided_output
from ddpm.diffusion.rng import Generators, randn
from ddpm.diffusion.samplers.base import Sampler, StepHook, check_prediction_type
from ddpm.diffusion.schedules import NoiseSchedule, karras_sigmas, x0_eps_from_output

SIGMA_TO_T = ("interpolate", "nearest")


class EDMSampler(Sampler):
    """Karras et al. 2022, Algorithm 2, in the variance-exploding scale x = x_t / alpha:

      sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
      (Eq. 5), sigma_N = 0; x_0 ~ N(0, sigma_0^2 I);
      churn:  gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= sigma_i <= S_max else 0,
              sigma^ = sigma_i (1 + gamma_i), x^ = x_i + sqrt(sigma^2 - sigma_i^2) S_noise z;
      Euler:  d = (x^ - D(x^; sigma^)) / sigma^, x_{i+1} = x^ + (sigma_{i+1} - sigma^) d;
      Heun:   unless sigma_{i+1} = 0, d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1},
              x_{i+1} = x^ + (sigma_{i+1} - sigma^) (d + d') / 2.

    2N - 1 network evaluations (N with ``solver="euler"``). The defaults (N = 18, rho = 7,
    sigma in [0.002, 80], no churn) are the paper's CIFAR-10 settings: 35 NFE.

    The network is any of this project's models on a discrete schedule, called as
    ``model(x_t, t)``: the denoiser D(x; sigma) evaluates it at x_t = x / sqrt(1 + sigma^2)
    and at the timestep of sigma, ``sigma_to_t``: ``interpolate`` (a fractional t,
    log-linear in sigma between grid points; exact for EDM-trained nets, whose
    ``PreconditionedModel`` maps it back to the same sigma) or ``nearest`` (each sigma
    rounded to the grid's nearest one, EDM's ``round_sigma`` for its iDDPM/DDPM nets). The
    output is turned into x_0 by the model's ``prediction_type``. [sigma_min, sigma_max] is
    clamped to the schedule's range, and to the range the model was trained for where it
    says (``model.sigma_min``, ``model.sigma_max``: a ``PreconditionedModel``), as EDM
    clamps it to the network's; every level, sigma^ of the churn included, is rounded by
    ``model.round_sigma`` where the model has one (iDDPM's u_j grid, EDM's
    ``round_sigma``), and sigma^ is clamped to the top of that range before the churn
    noise is added, so the net is always told the sigma the step uses.
    """

    name = "edm"

    def __init__(
        self,
        steps: int = 18,
        rho: float = 7.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        s_churn: float = 0.0,
        s_min: float = 0.0,
        s_max: float | None = math.inf,
        s_noise: float = 1.0,
        solver: str = "heun",
        sigma_to_t: str = "interpolate",
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
    ) -> None:
        if steps is None:
            raise ValueError("sampler.steps=null is not allowed for edm: give a number (18)")
        super().__init__(steps, clip_denoised, dynamic_threshold)
        s_max = math.inf if s_max is None else float(s_max)  # stored as None: plain JSON
        if not 0 < float(sigma_min) < float(sigma_max):
            raise ValueError(
                f"sampler.sigma_min={sigma_min} and sampler.sigma_max={sigma_max} must satisfy "
                "0 < sigma_min < sigma_max (EDM: 0.002 and 80)"
            )
        if not float(rho) > 0:
            raise ValueError(f"sampler.rho={rho} must be > 0 (EDM: 7)")
        if not float(s_churn) >= 0 or not float(s_noise) >= 0:
            raise ValueError(
                f"sampler.s_churn={s_churn} and sampler.s_noise={s_noise} must be >= 0"
            )
        if not 0 <= float(s_min) <= s_max:
            raise ValueError(f"sampler.s_min={s_min} must lie in [0, s_max={s_max}]")
        if solver not in ("heun", "euler"):
            raise ValueError(f"sampler.solver={solver!r} is unknown; choose heun or euler")
        if sigma_to_t not in SIGMA_TO_T:
            raise ValueError(
                f"sampler.sigma_to_t={sigma_to_t!r} is unknown; choose one of {list(SIGMA_TO_T)}"
            )
        self.rho, self.sigma_min, self.sigma_max = float(rho), float(sigma_min), float(sigma_max)
        self.s_churn, self.s_min = float(s_churn), float(s_min)
        self.s_max = None if math.isinf(s_max) else s_max
        self.s_noise, self.solver, self.sigma_to_t = float(s_noise), solver, sigma_to_t

    def nfe(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> int:
        return 2 * self.steps - 1 if self.solver == "heun" else self.steps

    def sigmas(self, schedule: NoiseSchedule, model: Model | None = None) -> list[float]:
        """The N noise levels of Eq. 5 within the range of the schedule and of ``model``
        (``_range``), rounded as the model and ``sigma_to_t`` say, then 0: N + 1 host
        floats."""
        lo, hi = self._range(schedule, model)
        sigmas = self._round(schedule, model, karras_sigmas(self.steps, lo, hi, self.rho))
        return [*sigmas.tolist(), 0.0]

    def _range(self, schedule: NoiseSchedule, model: Model | None) -> tuple[float, float]:
        """[sigma_min, sigma_max] clamped to the schedule's grid and to the noise levels
        the model was trained for, where it says (EDM's net.sigma_min / sigma_max)."""
        grid_min, grid_max = schedule.sigma_range()
        lo = max(self.sigma_min, grid_min, float(getattr(model, "sigma_min", 0.0)))
        hi = min(self.sigma_max, grid_max, float(getattr(model, "sigma_max", math.inf)))
        if lo >= hi:
            raise ValueError(
                f"sampler.sigma_min={self.sigma_min} and sigma_max={self.sigma_max} leave "
                f"nothing of the schedule's sigma range [{grid_min:.4g}, {grid_max:.4g}]"
            )
        return lo, hi

    def _round(self, schedule: NoiseSchedule, model: Model | None, sigmas: Tensor) -> Tensor:
        """Each sigma (float64 [N]) as the model rounds it within ``_range``
        (``model.round_sigma``, EDM's round_sigma), then with ``nearest`` replaced by the
        grid's nearest."""
        round_sigma = getattr(model, "round_sigma", None)
        if round_sigma is not None:
            sigmas = round_sigma(sigmas, *self._range(schedule, model))
        if self.sigma_to_t != "nearest":
            return sigmas
        t = schedule.t_for_sigma(sigmas, nearest=True).long()
        return schedule.log_sigmas.double().cpu()[t].exp()

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        schedule: NoiseSchedule,
        shape: Sequence[int],
        prediction_type: str = "epsilon",
        generator: Generators = None,
        progress: bool = False,
        on_step: StepHook | None = None,
        x_T: Tensor | None = None,
        y: Tensor | None = None,
        guidance_scale: float = 0.0,
    ) -> Tensor:
        """Draw [B, C, H, W] samples. ``x_T``, when given, is the standard-normal latent
        the chain starts from (x_0 = sigma_0 x_T), else it is drawn from ``generator``;
        churn noise comes from the same generators (one per sample: images depend on
        (seed, index) only). ``on_step(t, x_t, x0)`` sees each evaluation point as its
        nearest timestep, the VP-scaled image and the x_0 estimate."""
        check_prediction_type(prediction_type, schedule)
        device = schedule.betas.device
        n, sigmas = self.steps, self.sigmas(schedule, model)
        # sigma^ of each step (churn, Algorithm 2 lines 4-5), decided before the chain and
        # kept within the range the net can be told: above it, the net would be evaluated
        # at the top of the grid while c_in, c_out and the step used sigma^
        top = self._range(schedule, model)[1]
        hats = [min(sigma * (1 + self._gamma(sigma)), max(top, sigma)) for sigma in sigmas[:-1]]
        hats = self._round(schedule, model, torch.tensor(hats, dtype=torch.float64)).tolist()
        # the timestep of every noise level the network is evaluated at: one host pass
        points = sorted({*hats, *sigmas[1:-1]})
        t_values = schedule.t_for_sigma(torch.tensor(points), self._nearest()).tolist()
        timestep = dict(zip(points, t_values, strict=True))

        def denoise(x: Tensor, sigma: float) -> Tensor:
            """D(x; sigma): the model at x_t = alpha x and the timestep of sigma."""
            alpha = 1.0 / math.sqrt(1.0 + sigma**2)
            t = torch.full((x.shape[0],), timestep[sigma], device=device)
            x_t = x * alpha
            out = guided_output(model, x_t, t.long() if self._nearest() else t, y, guidance_scale)
            x0, _ = x0_eps_from_output(x_t, out.float(), alpha, sigma * alpha, prediction_type)
            x0 = self.process_x0(x0)
            if on_step is not None:
                on_step(round(timestep[sigma]), x_t, x0)
            return x0

        latent = randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
        x = latent * sigmas[0]
        for i in tqdm(range(n), desc="edm sampling", disable=not progress, leave=False):
            sigma, sigma_hat, sigma_next = sigmas[i], hats[i], sigmas[i + 1]
            if sigma_hat > sigma:  # churn: x^ = x + sqrt(sigma^2 - sigma_i^2) S_noise z (line 6)
                spread = math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise
                x = x + spread * randn(shape, generator, device)
            # Euler step (lines 7-8)
            d = (x - denoise(x, sigma_hat)) / sigma_hat
            x_next = x + (sigma_next - sigma_hat) * d
            # Heun's second-order correction (lines 9-11), except towards sigma = 0
            if self.solver == "heun" and sigma_next > 0:
                d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
            x = x_next
        return x

    def _gamma(self, sigma: float) -> float:
        """gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0 (line 4)."""
        s_max = math.inf if self.s_max is None else self.s_max
        if self.s_churn > 0 and self.s_min <= sigma <= s_max:
            return min(self.s_churn / self.steps, math.sqrt(2) - 1)
        return 0.0

    def _nearest(self) -> bool:
        return self.sigma_to_t == "nearest"
