"""Samplers: turn a noise predictor into images. They see only a callable
``model(x_t, t)`` and a NoiseSchedule; randomness comes from an injected generator."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.schedules import PREDICTION_TYPES, NoiseSchedule

Model = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
StepHook = Callable[[int, Tensor, Tensor], None]


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


def spaced_timesteps(num_timesteps: int, steps: int | None) -> list[int]:
    """``steps`` timesteps evenly spread over [0, T-1], descending, always ending at 0.

    ``None``, or any ``steps >= T``, keeps all T timesteps (a chain never has more steps
    than the schedule), so one sampler config serves schedules of any length.
    """
    if steps is None or steps >= num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if steps < 1:
        raise ValueError(f"sampler.steps={steps} must be >= 1, or null for all timesteps")
    grid = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()
    return sorted(set(grid.tolist()), reverse=True)


class DDPMSampler:
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2).

    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z,
    with sigma_t^2 = beta_t and no noise added at the last step.

    With ``steps < T`` the chain runs on a subsequence S of timesteps with the respaced
    betas beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}} (Nichol & Dhariwal 2021, Sec. 4);
    ``steps=None`` uses all T steps and is exactly Algorithm 2.

    ``clip_denoised`` clips the implied x_0 estimate to the data range [-1, 1] before the
    posterior mean is formed, as Ho et al.'s reference code does (``clip_denoised=True``).
    It matters most on the cosine schedule, where 1/sqrt(alpha_t) reaches ~30 near t = T.
    """

    def __init__(self, steps: int | None = None, clip_denoised: bool = True) -> None:
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"sampler.steps={steps!r} must be a positive integer or null")
        self.steps = steps
        self.clip_denoised = clip_denoised

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
    ) -> Tensor:
        """Draw a batch of ``shape`` = [B, C, H, W] samples from pure noise.

        ``on_step(t, x_t, x0_pred)`` is called at every step, before the update (for
        denoising trajectories)."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is unknown; choose one of "
                f"{list(PREDICTION_TYPES)}"
            )
        device = schedule.betas.device
        timesteps = spaced_timesteps(schedule.num_timesteps, self.steps)
        abar = schedule.alphas_cumprod
        x = randn(shape, generator, device)
        for i, step in enumerate(tqdm(timesteps, desc="sampling", disable=not progress)):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x0, _ = schedule.predict_x0_eps(x, t, model(x, t).float(), prediction_type)
            if self.clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            if on_step is not None:
                on_step(step, x, x0)
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            abar_t = abar[step]
            abar_prev = abar[prev] if prev is not None else abar.new_tensor(1.0)
            alpha_t = abar_t / abar_prev  # = 1 - beta_t when no step is skipped
            beta_t = 1.0 - alpha_t
            # mu_theta = mu~_t(x_t, x0_theta) (Ho et al. 2020, Eq. 7); with x0_theta from eps
            # unclipped this equals Eq. 11: (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
            coef_x0 = abar_prev.sqrt() * beta_t / (1.0 - abar_t)
            coef_xt = alpha_t.sqrt() * (1.0 - abar_prev) / (1.0 - abar_t)
            x = coef_x0 * x0 + coef_xt * x
            if prev is not None:
                x = x + beta_t.sqrt() * randn(shape, generator, device)
        return x
