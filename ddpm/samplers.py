"""Samplers: turn a trained denoiser into images. They see only a callable
``model(x_t, t)`` and a NoiseSchedule; randomness comes from an injected generator.

Every sampler evaluates the network at a descending list of timesteps (see
``ddpm.timesteps``) and jumps from the last one to the clean sample. Schedule
coefficients are read once per chain as float64 host numbers (no per-step device sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.schedules import PREDICTION_TYPES, NoiseSchedule
from ddpm.timesteps import SPACINGS, first_timestep, process_x0, spaced_timesteps

Model = Callable[..., Tensor]  # model(x_t, t) or, class-conditional, model(x_t, t, y=labels)
Generators = torch.Generator | Sequence[torch.Generator] | None
StepHook = Callable[[int, Tensor, Tensor], None]

__all__ = ["DDIMSampler", "DDPMSampler", "DPMSolverSampler", "Sampler", "randn"]


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str | None = None
) -> Tensor:
    """Standard normal noise of ``shape``, drawn from ``generator``.

    A list of generators (one per sample along dim 0) makes every sample's noise
    independent of the batch it is drawn in: the same seeds give the same images whatever
    the batch size. Noise is drawn on the generator's device, then moved to ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    # one [*shape[1:]] draw per generator -> [B, *shape[1:]]
    per_sample = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.stack(per_sample).to(device)


def guided_output(
    model: Model, x: Tensor, t: Tensor, y: Tensor | None = None, guidance_scale: float = 0.0
) -> Tensor:
    """The network's output at (x, t), class-conditional when ``y`` is given.

    With ``guidance_scale`` w != 0, classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    (1 + w) f(x, t, y) - w f(x, t, null), in one batched call whose second half carries the
    null label -1. It is linear in the output, so it serves every prediction type.
    w = 0 is the plain conditional prediction.
    """
    if y is None:
        return model(x, t)
    if guidance_scale == 0:
        return model(x, t, y=y)
    both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, -1)]))
    cond, uncond = both.chunk(2)  # [2B, C, H, W] -> two [B, C, H, W]
    return cond + guidance_scale * (cond - uncond)


def _check_prediction_type(prediction_type: str, schedule: NoiseSchedule) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is unknown; choose one of "
            f"{list(PREDICTION_TYPES)}"
        )
    if prediction_type == "epsilon" and schedule.zero_terminal_snr:
        raise ValueError(
            "a zero-terminal-SNR schedule cannot be sampled with epsilon prediction (x_0 = "
            "(x_T - eps) / 0 at t = T-1; Lin et al. 2023, Sec. 3.2); train with "
            "objective.prediction_type=v_prediction"
        )


@dataclass(frozen=True)
class Move:
    """One update of a chain: from alpha-bar ``abar_t`` to ``abar_prev`` (1.0 when ``last``:
    the clean sample); ``noise()`` draws fresh N(0, I) for the batch from its generator."""

    abar_t: float
    abar_prev: float
    last: bool
    noise: Callable[[], Tensor]


class Sampler:
    """What every sampler shares: the timestep list, the network call with its conversion
    to (x_0, eps), x_0 clipping or thresholding, the progress bar and the step hook.

    Subclasses implement ``step``: one ``Move`` from timestep t to the next given the x_0
    and eps estimates at t.
    """

    name = "sampler"

    def __init__(
        self,
        steps: int | None = None,
        spacing: str = "linspace",
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
        min_log_snr: float | None = None,
    ) -> None:
        if steps is not None and (
            not isinstance(steps, int) or isinstance(steps, bool) or steps < 1
        ):
            raise ValueError(f"sampler.steps={steps!r} must be a positive integer or null")
        if spacing not in SPACINGS:
            raise ValueError(
                f"sampler.spacing={spacing!r} is unknown; choose one of {list(SPACINGS)}"
            )
        if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
            raise ValueError(
                f"sampler.dynamic_threshold={dynamic_threshold!r} must be a quantile in "
                "(0, 1] (e.g. 0.995) or null"
            )
        self.steps = steps
        self.spacing = spacing
        self.clip_denoised = clip_denoised
        self.dynamic_threshold = dynamic_threshold
        self.min_log_snr = min_log_snr

    def timesteps(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> list[int]:
        """The descending timesteps this sampler evaluates the network at.

        ``min_log_snr`` truncates the top of the range for epsilon prediction only: a v or
        x_0 network's x_0 estimate does not blow up at low SNR (see ``first_timestep``).
        """
        log_snr = schedule.log_snr().cpu()  # [T] float64; spacing is host-side integer work
        floor = self.min_log_snr if prediction_type == "epsilon" else None
        t_max = first_timestep(log_snr, floor)
        return spaced_timesteps(t_max + 1, self.steps, self.spacing, log_snr)

    def denoise(
        self,
        model: Model,
        schedule: NoiseSchedule,
        x: Tensor,
        step: int,
        prediction_type: str,
        y: Tensor | None = None,
        guidance_scale: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """One network call at timestep ``step`` (guided when ``y`` and a scale are given):
        the (x_0, eps) estimates, x_0 clipped or thresholded and eps re-derived from it so
        the two stay consistent."""
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        out = guided_output(model, x, t, y, guidance_scale).float()
        x0, eps = schedule.predict_x0_eps(x, t, out, prediction_type)
        if self.clip_denoised or self.dynamic_threshold is not None:
            x0 = process_x0(x0, self.clip_denoised, self.dynamic_threshold)
            eps = schedule.eps_from_x0(x, t, x0)
        return x0, eps

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
        """Draw a batch of ``shape`` = [B, C, H, W] samples, from ``x_T`` when given (e.g.
        the output of ``DDIMSampler.invert``), else from noise drawn from ``generator``.
        ``y`` [B]: class labels for a conditional model, guided by ``guidance_scale``.

        ``on_step(t, x_t, x0_pred)`` is called at every step, before the update (for
        denoising trajectories)."""
        _check_prediction_type(prediction_type, schedule)
        device = schedule.betas.device
        timesteps = self.timesteps(schedule, prediction_type)
        abar = schedule.alphas_cumprod.double().tolist()  # one host read per chain
        x = randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
        self.start()
        for i, step in enumerate(
            tqdm(timesteps, desc=f"{self.name} sampling", disable=not progress, leave=False)
        ):
            x0, eps = self.denoise(model, schedule, x, step, prediction_type, y, guidance_scale)
            if on_step is not None:
                on_step(step, x, x0)
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            move = Move(
                abar_t=abar[step],
                abar_prev=abar[prev] if prev is not None else 1.0,
                last=prev is None,
                noise=lambda: randn(shape, generator, device),
            )
            x = self.step(x, x0, eps, move)
        return x

    def start(self) -> None:
        """Reset per-chain state (multistep solvers keep a history)."""

    def step(self, x: Tensor, x0: Tensor, eps: Tensor, move: Move) -> Tensor:
        raise NotImplementedError


class DDPMSampler(Sampler):
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


class DDIMSampler(Sampler):
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
        _check_prediction_type(prediction_type, schedule)
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


class DPMSolverSampler(Sampler):
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
