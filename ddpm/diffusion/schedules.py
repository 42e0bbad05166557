"""Beta schedules and the precomputed quantities of the forward process.

All schedule math is done in float64 and stored as float32 buffers (non-persistent: a
schedule is rebuilt from its config, never loaded from a checkpoint), so Lightning moves
them with the module and no code calls ``.to(device)`` on them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def linear_beta_schedule(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Linear betas from 1e-4 to 0.02 (Ho et al. 2020, Sec. 4), float64.

    For T != 1000 the end points are scaled by 1000/T so that the total noise stays
    comparable (Nichol & Dhariwal 2021, improved-diffusion ``get_named_beta_schedule``).
    """
    scale = 1000.0 / num_timesteps
    if scale * beta_end >= 1.0:
        raise ValueError(
            f"schedule.num_timesteps={num_timesteps} is too small for the linear schedule "
            "(its betas, scaled by 1000/T, would reach 1); use num_timesteps >= 21 or "
            "schedule=cosine"
        )
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17), float64.

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), and
    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at ``max_beta`` to avoid the
    singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def scaled_linear_beta_schedule(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Betas whose square roots are linear (Rombach et al. 2022, latent diffusion /
    Stable Diffusion), float64. End points are scaled by 1000/T like ``linear``."""
    scale = 1000.0 / num_timesteps
    if scale * beta_end >= 1.0:
        raise ValueError(
            f"schedule.num_timesteps={num_timesteps} is too small for the scaled_linear "
            "schedule (its betas, scaled by 1000/T, would reach 1); use more timesteps"
        )
    roots = torch.linspace(
        math.sqrt(scale * beta_start),
        math.sqrt(scale * beta_end),
        num_timesteps,
        dtype=torch.float64,
    )
    return roots**2


def sigmoid_beta_schedule(
    num_timesteps: int,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = 0.999,
) -> Tensor:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling", Algorithm 1;
    Jabri et al. 2022), float64.

    alpha_bar(t) = (sigmoid(end / tau) - sigmoid((t (end - start) + start) / tau))
                   / (sigmoid(end / tau) - sigmoid(start / tau)), t in [0, 1],
    and beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at ``max_beta`` like cosine.
    """
    if not end > start or not tau > 0:
        raise ValueError(
            f"sigmoid schedule needs end > start and tau > 0, got start={start}, end={end}, "
            f"tau={tau}"
        )
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alphas_cumprod = (v_end - torch.sigmoid((steps * (end - start) + start) / tau)) / (
        v_end - v_start
    )
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def edm_beta_schedule(
    num_timesteps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """Karras et al. 2022's noise levels as a discrete VP schedule, float64: T sigmas
    rho-spaced from ``sigma_min`` (t = 0) to ``sigma_max`` (t = T-1) (Eq. 5, ascending),
    with alpha_bar_t = 1 / (1 + sigma_t^2) (the VP <-> VE relation of Sec. 2 and App. C.2:
    x_t = x / sqrt(1 + sigma^2)) and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.

    It is the grid on which DDPM/DDIM/DPM-Solver sample an EDM-trained net, and the range
    ``EDMSampler`` clamps its own sigmas to."""
    if not 0 < sigma_min < sigma_max or not rho > 0:
        raise ValueError(
            f"schedule.sigma_min={sigma_min}, schedule.sigma_max={sigma_max} and "
            f"schedule.rho={rho} must satisfy 0 < sigma_min < sigma_max and rho > 0 "
            "(EDM: 0.002, 80, 7)"
        )
    sigmas = karras_sigmas(num_timesteps, sigma_min, sigma_max, rho).flip(0)  # ascending
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, descending, float64 (one
    point, sigma_max, when N = 1)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp.double() * (lo - hi)) ** rho


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so that it is unchanged at t = 0 and exactly 0 at
    t = T-1: zero terminal SNR (Lin et al. 2023, Algorithm 1). The last beta becomes 1."""
    sqrt_abar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_beta_schedule,
    "scaled_linear": scaled_linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
    "edm": edm_beta_schedule,
}


def extract(a: Tensor, t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Gather ``a[t]`` and reshape it to broadcast against a tensor of ``shape``."""
    # a: [T], t: [B] -> [B, 1, 1, ...] with len(shape) - 1 trailing singleton dims
    return a.gather(0, t).view(t.shape[0], *([1] * (len(shape) - 1)))


class NoiseSchedule(nn.Module):
    """The fixed forward process q(x_t | x_0) of a DDPM and the conversions between
    what a network may predict (noise, clean sample, or velocity).

    Timesteps are zero-based: t = 0 .. T-1, with alpha_bar_t = prod_{s<=t} (1 - beta_s).
    """

    def __init__(self, betas: Tensor) -> None:
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(
                f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

        # Posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (Ho et al. 2020, Eqs. 6-7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)

        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            # 1 - abar from float64: in float32, 1 - abar(t=0) = 1 - 0.9999 is off by 3e-4
            "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_mean_coef1": posterior_mean_coef1,
            "posterior_mean_coef2": posterior_mean_coef2,
            # log sigma_t, sigma = sqrt((1 - abar) / abar): the VE noise level of step t
            # (Karras et al. 2022, Sec. 2); +inf where abar = 0 (zero terminal SNR)
            "log_sigmas": 0.5 * ((1.0 - alphas_cumprod).log() - alphas_cumprod.log()),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @classmethod
    def from_name(
        cls,
        name: str,
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        **params: float,
    ) -> NoiseSchedule:
        """Build a named schedule (``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``).

        ``params`` go to the beta function (e.g. ``beta_end`` for linear, ``tau`` for
        sigmoid); ``zero_terminal_snr`` rescales the result (Lin et al. 2023).
        """
        if name not in BETA_SCHEDULES:
            raise ValueError(
                f"schedule.name={name!r} is unknown; choose one of {sorted(BETA_SCHEDULES)}"
            )
        if (
            not isinstance(num_timesteps, int)
            or isinstance(num_timesteps, bool)
            or (num_timesteps < 1)
        ):
            raise ValueError(
                f"schedule.num_timesteps={num_timesteps!r} must be an integer >= 1 (e.g. 1000)"
            )
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(
                f"schedule.zero_terminal_snr={zero_terminal_snr!r} must be true or false"
            )
        allowed = list(inspect.signature(BETA_SCHEDULES[name]).parameters)[1:]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"schedule.{unknown[0]} is not a parameter of the {name} schedule; "
                f"it takes {allowed}"
            )
        betas = BETA_SCHEDULES[name](num_timesteps, **params)
        if zero_terminal_snr:
            if num_timesteps < 2:
                raise ValueError("schedule.zero_terminal_snr=true needs num_timesteps >= 2")
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. Eq. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """mu~_t(x_t, x_0) of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 7)."""
        return (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether alpha_bar reaches exactly 0 at t = T-1 (x_T carries no signal)."""
        return bool(self.alphas_cumprod[-1] == 0)

    def log_snr(self) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t) for every t, float64 [T] (Lu et al. 2022,
        Sec. 2; alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)); -inf where abar_t = 0."""
        abar = self.alphas_cumprod.double()
        return 0.5 * (abar.log() - self.one_minus_alphas_cumprod.double().log())

    def sigma_at(self, t: Tensor) -> Tensor:
        """sigma(t) [B] float32 at integer or fractional timesteps t [B]: the grid's sigma_t
        at integers, log-linear between neighbours (the inverse of ``t_for_sigma``)."""
        t = t.float().clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        frac = t - lo.float()
        log_lo, log_hi = self.log_sigmas.gather(0, lo), self.log_sigmas.gather(0, hi)
        # frac = 0 must not touch log_hi: it is +inf at t = T-1 under zero terminal SNR
        return torch.where(frac > 0, log_lo + frac * (log_hi - log_lo), log_lo).exp()

    def t_for_sigma(self, sigmas: Tensor, nearest: bool = False) -> Tensor:
        """The timestep of each noise level in ``sigmas`` (float64, host): fractional,
        log-linear between grid points (``nearest=False``), or the grid index whose sigma is
        nearest in log (``nearest=True``, Karras et al. 2022's ``round_sigma`` for
        discrete-time nets). Sigmas outside the grid map to its ends."""
        log_grid = self.log_sigmas.double().cpu()  # ascending in t
        finite = int(torch.isfinite(log_grid).sum())  # +inf at the top: zero terminal SNR
        log_grid = log_grid[:finite]
        target = sigmas.double().cpu().log().clamp(log_grid[0], log_grid[-1])
        hi = torch.searchsorted(log_grid, target).clamp(1, max(finite - 1, 1))
        lo = hi - 1
        if finite == 1:
            return torch.zeros_like(target)
        span = (log_grid[hi] - log_grid[lo]).clamp(min=1e-12)
        frac = ((target - log_grid[lo]) / span).clamp(0, 1)
        if nearest:
            return torch.where(frac > 0.5, hi, lo).double()
        return lo.double() + frac

    def sigma_range(self) -> tuple[float, float]:
        """The smallest and the largest finite sigma of the grid (host floats)."""
        log_grid = self.log_sigmas.double()
        finite = log_grid[torch.isfinite(log_grid)]
        return float(finite[0].exp()), float(finite[-1].exp())

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (Kingma et al. 2021, Eq. 2)."""
        return self.alphas_cumprod.gather(0, t) / self.one_minus_alphas_cumprod.gather(0, t)

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise implied by x_t and an x_0 estimate: (x_t - sqrt(abar) x_0) / sqrt(1 - abar)
        (Ho et al. Eq. 4 solved for eps); samplers use it after clipping x_0."""
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_t.shape
        )

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What a network of ``prediction_type`` should output for (x_0, eps, t)."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        raise ValueError(_bad_prediction_type(prediction_type))

    def predict_x0_eps(
        self, x_t: Tensor, t: Tensor, model_output: Tensor, prediction_type: str
    ) -> tuple[Tensor, Tensor]:
        """Convert a network output at integer timesteps t to (x_0 estimate, eps estimate)."""
        sqrt_ab = extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_1m_ab = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        return x0_eps_from_output(x_t, model_output, sqrt_ab, sqrt_1m_ab, prediction_type)


def x0_eps_from_output(
    x_t: Tensor,
    model_output: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    prediction_type: str,
) -> tuple[Tensor, Tensor]:
    """(x_0 estimate, eps estimate) from a network output at the noise level where
    x_t = alpha x_0 + sigma eps, alpha = sqrt(abar), sigma = sqrt(1 - abar) (Ho et al.
    Eq. 4), and v = alpha eps - sigma x_0 (Salimans & Ho 2022). ``alpha``/``sigma``
    broadcast against x_t: tensors [B, 1, 1, 1] or host floats."""
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - sigma * eps) / alpha, eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        v = model_output
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v
    raise ValueError(_bad_prediction_type(prediction_type))


def _bad_prediction_type(value: str) -> str:
    return f"prediction_type={value!r} is unknown; choose one of {list(PREDICTION_TYPES)}"
