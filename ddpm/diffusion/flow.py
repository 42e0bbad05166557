"""Conditional flow matching on the straight path (Lipman et al. 2023; Liu et al. 2023,
rectified flow): x_t = (1 - t) x_0 + t eps for t in [0, 1], and the net regresses the
velocity v = dx_t/dt = eps - x_0, with the time distributions of Esser et al. 2024 (SD3).

The path is a variance-exploding process in disguise: x_t / (1 - t) = x_0 + sigma eps with
sigma = t / (1 - t). ``FlowModel`` uses that to hand every sampler of this project an x_0
estimate at its own timesteps, and its ``velocity`` to the flow ODE samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.diffusion.objectives import (
    Model,
    conditioning,
    loss_inputs,
    per_index_levels_and_noise,
    step_draws,
)
from ddpm.diffusion.schedules import NoiseSchedule

TIME_SAMPLINGS = ("uniform", "logit_normal")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift (Esser et al. 2024, Eq. 23): t' = s t / (1 + (s - 1) t),
    which moves time towards noise for s > 1 (more pixels keep more signal at equal t)."""
    return shift * t / (1 + (shift - 1) * t)


def _column(v: Tensor, ndim: int) -> Tensor:
    return v.float().view(-1, *[1] * (ndim - 1))  # [B] -> [B, 1, 1, 1]


class FlowModel:
    """A velocity net as every sampler calls a model. ``model(x_t, t[, y=...])`` at the
    schedule's timesteps t [B] (integer or fractional; x_t in the schedule's variance-
    preserving scale) returns the x_0 estimate (prediction type ``sample``): with sigma =
    ``schedule.sigma_at(t)``, the VE image x = x_t sqrt(1 + sigma^2) lies on the straight
    path at time tau = sigma / (1 + sigma) as x / (1 + sigma), where x_0 = x_tau - tau v.
    ``velocity(x, t)`` is the net on the path itself (t [B] in [0, 1])."""

    def __init__(self, net: Model, schedule: Any, t_scale: float = 1000.0) -> None:
        self.net, self.schedule, self.t_scale = net, schedule, float(t_scale)

    def velocity(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """v(x_t, t): the net told the time as t_scale t (the timestep range its sinusoidal
        embedding was made for)."""
        return self.net(x, t.float() * self.t_scale, **cond).float()

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        sigma = self.schedule.sigma_at(t).float()  # [B]
        tau = sigma / (1 + sigma)
        x = x_t.float() * _column((1 + sigma**2).sqrt() / (1 + sigma), x_t.ndim)  # on the path
        return x - _column(tau, x.ndim) * self.velocity(x, tau, **cond)


class FlowLoss:
    """E_{t, x_0, eps} ||v_theta(x_t, t) - (eps - x_0)||^2 with x_t = (1 - t) x_0 + t eps
    (Lipman et al. 2023, Eq. 23 with sigma_min = 0; Liu et al. 2023, Eq. 1), one loss per
    sample. ``time_sampling``: ``uniform`` t ~ U(0, 1), or ``logit_normal`` t = sigmoid(u),
    u ~ N(``logit_mean``, ``logit_std``^2) (Esser et al. 2024, Sec. 3.1, Eq. 19: their best,
    m = 0, s = 1); then SD3's ``shift`` (1: none). ``t_scale``: the net is told t_scale t."""

    prediction_type = "sample"  # the samplers see FlowModel: an x_0 estimate
    level_name = "t"

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        t_scale: float = 1000.0,
        cond_drop_prob: float = 0.1,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"objective.time_sampling={time_sampling!r} is unknown; choose one of "
                f"{list(TIME_SAMPLINGS)}"
            )
        if not float(logit_std) > 0 or not math.isfinite(float(logit_mean)):
            raise ValueError(
                f"objective.logit_mean={logit_mean} and objective.logit_std={logit_std} must "
                "be finite, logit_std > 0 (Esser et al.: 0 and 1)"
            )
        if not float(shift) > 0:
            raise ValueError(f"objective.shift={shift} must be > 0 (1: no shift; SD3: 3)")
        if not float(t_scale) > 0:
            raise ValueError(f"objective.t_scale={t_scale} must be > 0 (1000)")
        if not 0.0 <= float(cond_drop_prob) < 1.0:
            raise ValueError(
                f"objective.cond_drop_prob={cond_drop_prob!r} must lie in [0, 1) (0.1 in Ho & "
                "Salimans 2022)"
            )
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.shift, self.t_scale = float(shift), float(t_scale)
        self.cond_drop_prob = float(cond_drop_prob)

    def sample_t(self, n: int, device: Any = None, generator: Any = None) -> Tensor:
        """n training times [n] in (0, 1) from the configured distribution."""
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device, generator=generator)
        else:
            u = torch.randn(n, device=device, generator=generator)
            t = torch.sigmoid(u * self.logit_std + self.logit_mean)
        return shift_time(t, self.shift) if self.shift != 1.0 else t

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Refuse a sampling grid with an infinite sigma (no finite point on the path)."""
        if schedule.zero_terminal_snr:
            raise ValueError(
                "objective=flow samples on the schedule's sigma grid, and "
                "schedule.zero_terminal_snr=true makes its last sigma infinite; set "
                "schedule.zero_terminal_snr=false (schedule=edm is the flow preset's grid)"
            )

    def sampling_model(self, net: Model, schedule: NoiseSchedule) -> FlowModel:
        """The velocity net seen by the samplers (x_0 at timesteps; ``velocity``)."""
        return FlowModel(net, schedule, self.t_scale)

    def draw(
        self, x0: Tensor, schedule: NoiseSchedule, share: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, Tensor]:
        """The times [B] and noise of micro-batch ``share`` = (i, k) of a training step,
        drawn for k x B samples (``step_share``)."""
        return step_draws(x0, share, self._levels(x0))

    def _levels(self, x0: Tensor) -> Callable[[int], Tensor]:
        """n training times from ``sample_t``, on ``x0``'s device."""
        return lambda n: self.sample_t(n, device=x0.device)

    def __call__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        y: Tensor | None = None,
        drop_labels: bool = True,
        aug: Tensor | None = None,
    ) -> Tensor:
        """Per-sample loss [B]; ``t`` [B] and ``noise`` are drawn when not given."""
        t, noise, y = loss_inputs(
            x0, t, noise, y, self.cond_drop_prob if drop_labels else 0.0, self._levels(x0)
        )
        tc = _column(t, x0.ndim)
        x_t = (1 - tc) * x0.float() + tc * noise.float()  # the straight path
        target = noise.float() - x0.float()  # v = d x_t / dt
        out = model(x_t, t.float() * self.t_scale, **conditioning(y, aug))
        return (out.float() - target).flatten(1).pow(2).mean(dim=1)  # [B, C, H, W] -> [B]

    def fixed_levels(
        self,
        indices: Sequence[int] | Tensor,
        shape: Sequence[int],
        schedule: NoiseSchedule,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Validation's (t [B], noise [B, *shape]) per image index, from the training
        distribution of t with the index's own generator (CPU)."""

        def draw(g: torch.Generator) -> Tensor:
            return self.sample_t(1, generator=g)

        return per_index_levels_and_noise(indices, shape, draw, seed)

    def bucket(self, t: Tensor, num_buckets: int, schedule: NoiseSchedule) -> Tensor:
        """The chart bucket of each time: ``num_buckets`` equal ranges of [0, 1]."""
        return (t.float() * num_buckets).long().clamp(0, num_buckets - 1)

    def bucket_labels(self, num_buckets: int, schedule: NoiseSchedule) -> list[str]:
        """``lo-hi`` time range of each bucket."""
        return [f"{i / num_buckets:.2f}-{(i + 1) / num_buckets:.2f}" for i in range(num_buckets)]
