"""Preconditioning of a denoiser network (Karras et al. 2022, "EDM", Sec. 5 and Table 1).

The denoiser is D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
(Eq. 7), where x = y + n, n ~ N(0, sigma^2 I), is the noisy image in the variance-exploding
scale and F the raw network, which knows no diffusion. Each column of Table 1 is one class
here: its four coefficients, the training distribution of sigma and the loss weight
lambda(sigma). With lambda = 1 / c_out^2 for every variant, F regresses a target of unit
weight at every noise level (Eq. 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Device = torch.device | str | None
Generator = torch.Generator | None
Net = Callable[..., Tensor]  # net(x [B, C, H, W], c_noise [B], **conditioning) -> [B, C, H, W]


def _as_column(sigma: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1], float32, to broadcast against images."""
    return sigma.float().view(-1, 1, 1, 1)


class Preconditioning:
    """One column of Karras et al.'s Table 1. Subclasses define ``coefficients``,
    ``sample_sigma`` and ``weight``; ``sigma_min``/``sigma_max`` bound the noise levels the
    network is trained for (used for charts and sampling ranges)."""

    name = "preconditioning"
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) as [B, 1, 1, 1] and c_noise as [B], for sigma [B]."""
        raise NotImplementedError

    def sample_sigma(self, n: int, device: Device = None, generator: Generator = None) -> Tensor:
        """n training noise levels [n] from the variant's distribution (from ``generator``,
        else the global one)."""
        raise NotImplementedError

    def weight(self, sigma: Tensor) -> Tensor:
        """The loss weight lambda(sigma) [B]: 1 / c_out^2 unless a subclass says otherwise."""
        return 1.0 / sigma.float() ** 2

    def denoise(self, net: Net, x: Tensor, sigma: Tensor, **conditioning: Any) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7), float32 whatever
        precision F runs in. ``conditioning`` (``y``, ``aug``) goes to the net as is."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x = x.float()
        return c_skip * x + c_out * net(c_in * x, c_noise, **conditioning).float()

    def log_sigma_range(self) -> tuple[float, float]:
        """The span of ln(sigma) the loss-by-noise-level chart covers."""
        return math.log(self.sigma_min), math.log(self.sigma_max)

    def round_sigma(self, sigma: Tensor, lo: float = 0.0, hi: float = math.inf) -> Tensor:
        """The noise level the network is evaluated at for ``sigma`` (which lies in [lo,
        hi]): sigma itself, unless the network knows a discrete set of levels (iDDPM; EDM's
        ``round_sigma``), of which the nearest inside [lo, hi] is taken."""
        return sigma


class EDMPrecond(Preconditioning):
    """EDM (Table 1, last column): c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd /
    sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 with
    sd = ``sigma_data``; training ln(sigma) ~ N(P_mean, P_std^2) and lambda(sigma) =
    (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2."""

    name = "edm"

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        if not float(sigma_data) > 0:
            raise ValueError(
                f"objective.preconditioning.sigma_data={sigma_data!r} must be > 0 (the data's "
                "standard deviation; 0.5 in Karras et al.)"
            )
        if not float(p_std) > 0:
            raise ValueError(f"objective.preconditioning.p_std={p_std!r} must be > 0 (EDM: 1.2)")
        _check_range(sigma_min, sigma_max)
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s, sd = _as_column(sigma), self.sigma_data
        norm = (s**2 + sd**2).sqrt()
        return sd**2 / norm**2, s * sd / norm, 1.0 / norm, sigma.float().log() / 4

    def sample_sigma(self, n: int, device: Device = None, generator: Generator = None) -> Tensor:
        normal = torch.randn(n, device=device, generator=generator)
        return (normal * self.p_std + self.p_mean).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        s = sigma.float()
        return (s**2 + self.sigma_data**2) / (s * self.sigma_data) ** 2

    def log_sigma_range(self) -> tuple[float, float]:
        # where the training (and validation) noise levels lie: P_mean +- 3 P_std
        return self.p_mean - 3 * self.p_std, self.p_mean + 3 * self.p_std


class VPPrecond(Preconditioning):
    """VP (Song et al. 2021, Table 1, first column): sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1); c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise =
    (M - 1) sigma^-1(sigma); training t ~ U(eps_t, 1), lambda = 1 / sigma^2. F predicts the
    noise: D = x - sigma F is this project's epsilon parameterisation."""

    name = "vp"

    def __init__(
        self, beta_d: float = 19.9, beta_min: float = 0.1, m: int = 1000, epsilon_t: float = 1e-5
    ) -> None:
        if not (beta_d > 0 and beta_min >= 0 and m >= 2 and 0 < epsilon_t < 1):
            raise ValueError(
                "objective.preconditioning (vp) needs beta_d > 0, beta_min >= 0, m >= 2 and "
                f"epsilon_t in (0, 1), got beta_d={beta_d}, beta_min={beta_min}, m={m}, "
                f"epsilon_t={epsilon_t}"
            )
        self.beta_d, self.beta_min, self.m, self.epsilon_t = (
            float(beta_d),
            float(beta_min),
            int(m),
            float(epsilon_t),
        )
        self.sigma_min = float(self.sigma_of_t(torch.tensor(epsilon_t, dtype=torch.float64)))
        self.sigma_max = float(self.sigma_of_t(torch.tensor(1.0, dtype=torch.float64)))

    def sigma_of_t(self, t: Tensor) -> Tensor:
        """sigma(t) of the VP SDE (Table 1, "Schedule"); expm1 keeps sigma(1e-5) = 0.001
        exact (exp(x) - 1 in float32 gives 0.00098)."""
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """sigma^-1: the root of beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2)."""
        log1p = (sigma.float() ** 2).log1p()
        return ((self.beta_min**2 + 2 * self.beta_d * log1p).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = _as_column(sigma)
        c_noise = (self.m - 1) * self.t_of_sigma(sigma)
        return torch.ones_like(s), -s, 1.0 / (s**2 + 1).sqrt(), c_noise

    def sample_sigma(self, n: int, device: Device = None, generator: Generator = None) -> Tensor:
        t = 1 + torch.rand(n, device=device, generator=generator) * (self.epsilon_t - 1)
        return self.sigma_of_t(t)


class VEPrecond(Preconditioning):
    """VE (Song et al. 2021, Table 1, second column): c_skip = 1, c_out = sigma, c_in = 1,
    c_noise = ln(sigma / 2); training ln(sigma) ~ U(ln sigma_min, ln sigma_max),
    lambda = 1 / sigma^2."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        _check_range(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = _as_column(sigma)
        return torch.ones_like(s), s, torch.ones_like(s), (0.5 * sigma.float()).log()

    def sample_sigma(self, n: int, device: Device = None, generator: Generator = None) -> Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + torch.rand(n, device=device, generator=generator) * (hi - lo)).exp()


class IDDPMPrecond(Preconditioning):
    """iDDPM (Nichol & Dhariwal 2021; Table 1, third column): the M noise levels u_j of the
    cosine schedule, built backwards by u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} /
    abar_j, C_1) - 1), u_M = 0; c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = M - 1 - argmin_j |u_j - sigma|; training sigma = u_j, j ~ U{0, ..., M-1},
    lambda = 1 / sigma^2."""

    name = "iddpm"

    def __init__(self, c_1: float = 0.001, c_2: float = 0.008, m: int = 1000) -> None:
        if not (0 < c_1 < 1 and c_2 >= 0 and m >= 2):
            raise ValueError(
                "objective.preconditioning (iddpm) needs c_1 in (0, 1), c_2 >= 0 and m >= 2, "
                f"got c_1={c_1}, c_2={c_2}, m={m}"
            )
        self.c_1, self.c_2, self.m = float(c_1), float(c_2), int(m)

        def abar(j: int) -> float:
            return math.sin(0.5 * math.pi * j / m / (c_2 + 1)) ** 2

        u = [0.0] * (m + 1)
        for j in range(m, 0, -1):
            u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), c_1) - 1)
        self._u = torch.tensor(u[:m], dtype=torch.float32)  # [M], descending in j
        self._on_device: dict[torch.device, Tensor] = {}
        self.sigma_min, self.sigma_max = float(u[m - 1]), float(u[0])

    def _grid(self, device: torch.device) -> Tensor:
        if device not in self._on_device:  # copied once per device
            self._on_device[device] = self._u.to(device)
        return self._on_device[device]

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = _as_column(sigma)
        u = self._grid(sigma.device)
        index = (sigma.float()[:, None] - u[None, :]).abs().argmin(dim=1)  # [B, M] -> [B]
        return torch.ones_like(s), -s, 1.0 / (s**2 + 1).sqrt(), (self.m - 1 - index).float()

    def sample_sigma(self, n: int, device: Device = None, generator: Generator = None) -> Tensor:
        j = torch.randint(0, self.m, (n,), device=device, generator=generator)
        return self._grid(j.device).gather(0, j)

    def round_sigma(self, sigma: Tensor, lo: float = 0.0, hi: float = math.inf) -> Tensor:
        """Each sigma replaced by the nearest u_j inside [lo, hi] (the schedule's grid may
        end below u_0), in ``sigma``'s dtype and device."""
        u = self._u.to(sigma.device, torch.float64)
        slack = 1e-6  # relative: u_j are float32, the bounds float64
        u = u[(u >= lo * (1 - slack)) & (u <= hi * (1 + slack))]
        index = (sigma.double().reshape(-1, 1) - u[None, :]).abs().argmin(dim=1)  # [B, M] -> [B]
        return u[index].reshape(sigma.shape).to(sigma.dtype)


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < float(sigma_min) < float(sigma_max):
        raise ValueError(
            f"objective.preconditioning needs 0 < sigma_min < sigma_max, got "
            f"sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


class PreconditionedModel:
    """A preconditioned net as every sampler calls a model: ``model(x_t, t[, y=...])`` at
    the schedule's timesteps t [B] (integer or fractional), returning the x_0 estimate
    (prediction type ``sample``). x_t is in the variance-preserving scale of the schedule,
    so with sigma = ``schedule.sigma_at(t)`` the VE image is x = x_t sqrt(1 + sigma^2)
    (Karras et al. 2022, Sec. 2 and Eq. 7: x_t = s(t) x with s = 1 / sqrt(1 + sigma^2)),
    and the output is D(x; sigma)."""

    def __init__(self, net: Net, preconditioning: Preconditioning, schedule: Any) -> None:
        self.net, self.preconditioning, self.schedule = net, preconditioning, schedule
        # the noise levels the net was trained for, which EDMSampler keeps to (as NVlabs'
        # sampler keeps to net.sigma_min, net.sigma_max and net.round_sigma)
        self.sigma_min, self.sigma_max = preconditioning.sigma_min, preconditioning.sigma_max
        self.round_sigma = preconditioning.round_sigma

    def __call__(self, x_t: Tensor, t: Tensor, **conditioning: Any) -> Tensor:
        sigma = self.schedule.sigma_at(t)  # [B]
        x = x_t.float() * _as_column((1 + sigma**2).sqrt())
        return self.preconditioning.denoise(self.net, x, sigma, **conditioning)
