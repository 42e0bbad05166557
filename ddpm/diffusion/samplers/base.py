"""What samplers share. ``Sampler``: the call every sampler answers (``sample``), its step
count and x_0 clipping or thresholding. ``TimestepSampler``: the family that walks a
descending list of the schedule's timesteps (DDPM, DDIM, DPM-Solver): the timestep list,
the network call and its conversion to (x_0, eps), the progress bar and the step hook.

Samplers see only a callable ``model(x_t, t)`` and a NoiseSchedule; randomness comes from
an injected generator. Schedule coefficients are read once per chain as float64 host
numbers (no per-step device sync).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion.guidance import Model, guided_output
from ddpm.diffusion.rng import Generators, randn
from ddpm.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from ddpm.diffusion.timesteps import SPACINGS, first_timestep, process_x0, spaced_timesteps

StepHook = Callable[[int, Tensor, Tensor], None]


def check_prediction_type(prediction_type: str, schedule: NoiseSchedule) -> None:
    """Refuse a prediction type that is unknown, or that ``schedule`` cannot be sampled with."""
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
    """What every sampler is: ``sample(model, schedule, shape, prediction_type=...,
    generator=..., progress=..., on_step=..., x_T=..., y=..., guidance_scale=...)``, a
    step count, and what it does with the x_0 estimate (``clip_denoised``: clip to [-1, 1];
    ``dynamic_threshold``: Imagen's rule at that quantile instead)."""

    name = "sampler"

    def __init__(
        self,
        steps: int | None = None,
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
    ) -> None:
        if steps is not None and (
            not isinstance(steps, int) or isinstance(steps, bool) or steps < 1
        ):
            raise ValueError(f"sampler.steps={steps!r} must be a positive integer or null")
        if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
            raise ValueError(
                f"sampler.dynamic_threshold={dynamic_threshold!r} must be a quantile in "
                "(0, 1] (e.g. 0.995) or null"
            )
        self.steps = steps
        self.clip_denoised = clip_denoised
        self.dynamic_threshold = dynamic_threshold

    def process_x0(self, x0: Tensor) -> Tensor:
        """The x_0 estimate clipped or thresholded as configured (unchanged when neither)."""
        if self.clip_denoised or self.dynamic_threshold is not None:
            return process_x0(x0, self.clip_denoised, self.dynamic_threshold)
        return x0

    def nfe(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> int:
        """Network evaluations per sample (without guidance's doubled batch)."""
        raise NotImplementedError

    def check_objective(self, objective: object) -> None:
        """Refuse an objective whose nets this sampler cannot draw from (every sampler takes
        the x_0, eps or v a ``sampling_model`` returns; the flow samplers need more)."""

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
        raise NotImplementedError


class TimestepSampler(Sampler):
    """Samplers that evaluate the network at a descending list of the schedule's
    timesteps (see ``ddpm.diffusion.timesteps``) and jump from the last one to the clean
    sample. Subclasses implement ``step``: one ``Move`` from timestep t to the next given
    the x_0 and eps estimates at t.
    """

    def __init__(
        self,
        steps: int | None = None,
        spacing: str = "linspace",
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
        min_log_snr: float | None = None,
    ) -> None:
        super().__init__(steps, clip_denoised, dynamic_threshold)
        if spacing not in SPACINGS:
            raise ValueError(
                f"sampler.spacing={spacing!r} is unknown; choose one of {list(SPACINGS)}"
            )
        self.spacing = spacing
        self.min_log_snr = min_log_snr

    def nfe(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> int:
        return len(self.timesteps(schedule, prediction_type))

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
            x0 = self.process_x0(x0)
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
        check_prediction_type(prediction_type, schedule)
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
