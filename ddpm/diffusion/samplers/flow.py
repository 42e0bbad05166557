"""ODE samplers of flow matching (Lipman et al. 2023; Liu et al. 2023): dx/dt = v(x, t)
integrated from pure noise at t = 1 to the data at t = 0, with Euler or Heun steps on a
uniform time grid, optionally shifted towards noise (Esser et al. 2024, Eq. 23)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion.flow import FlowLoss
from ddpm.diffusion.guidance import Model, guided_output
from ddpm.diffusion.rng import Generators, randn
from ddpm.diffusion.samplers.base import Sampler, StepHook
from ddpm.diffusion.schedules import NoiseSchedule

SOLVERS = ("euler", "heun")


class FlowSampler(Sampler):
    """Euler (N network calls) or Heun (2N - 1: no correction on the last step, which ends
    at the data) over t_i = shift(1 - i / N), i = 0..N, where shift(t) = s t / (1 + (s - 1) t):

      Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i);
      Heun:  x' = Euler step, x_{i+1} = x_i + (t_{i+1} - t_i) (v(x_i, t_i) + v(x', t_{i+1})) / 2.

    It needs the velocity of a flow-matching net (``objective=flow``); with classifier-free
    guidance the velocity is guided (it is linear in the net's output)."""

    def __init__(
        self,
        steps: int = 16,
        solver: str = "heun",
        shift: float = 1.0,
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
    ) -> None:
        if steps is None:
            raise ValueError("sampler.steps=null is not allowed for flow samplers: give a number")
        super().__init__(steps, clip_denoised, dynamic_threshold)
        if solver not in SOLVERS:
            raise ValueError(f"sampler.solver={solver!r} is unknown; choose one of {SOLVERS}")
        if not float(shift) > 0:
            raise ValueError(f"sampler.shift={shift} must be > 0 (1: a uniform time grid)")
        self.solver, self.shift = solver, float(shift)

    @property
    def name(self) -> str:  # type: ignore[override]
        """The config option: flow_euler or flow_heun."""
        return f"flow_{self.solver}"

    def check_objective(self, objective: object) -> None:
        if not isinstance(objective, FlowLoss):
            raise ValueError(
                f"sampler={self.name} integrates a flow-matching velocity, which "
                f"{type(objective).__name__} does not train; use sampler=edm|ddim|dpm_solver|"
                "ddpm, or train with objective=flow"
            )

    def nfe(self, schedule: NoiseSchedule, prediction_type: str = "sample") -> int:
        return 2 * self.steps - 1 if self.solver == "heun" else self.steps

    def times(self) -> list[float]:
        """The N + 1 times from 1 down to 0, shifted (host floats)."""
        t = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        return (self.shift * t / (1 + (self.shift - 1) * t)).tolist()

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        schedule: NoiseSchedule,
        shape: Sequence[int],
        prediction_type: str = "sample",
        generator: Generators = None,
        progress: bool = False,
        on_step: StepHook | None = None,
        x_T: Tensor | None = None,
        y: Tensor | None = None,
        guidance_scale: float = 0.0,
    ) -> Tensor:
        """Draw [B, C, H, W] samples from ``x_T`` (standard normal) or noise from
        ``generator``. ``on_step(t, x_t, x0)`` sees each evaluation as the schedule's
        nearest timestep, the variance-preserving image and the x_0 estimate."""
        velocity = getattr(model, "velocity", None)
        if velocity is None:
            raise ValueError(
                f"sampler={self.name} integrates a flow-matching velocity and this model has "
                "none; train with objective=flow, or use sampler=edm|ddim|dpm_solver|ddpm"
            )
        device = schedule.betas.device
        x = randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
        times = self.times()

        def v(x: Tensor, t: float) -> Tensor:
            t_batch = torch.full((x.shape[0],), t, device=device)
            out = guided_output(velocity, x, t_batch, y, guidance_scale).float()
            processed = self.clip_denoised or self.dynamic_threshold is not None
            if on_step is not None or processed:
                x0 = self.process_x0(x - t * out)  # x_0 = x_t - t v on the straight path
                if on_step is not None:
                    self._report(on_step, schedule, x, t, x0)
                if processed:  # v re-derived from the processed x_0 (t > 0 here)
                    out = (x - x0) / t
            return out

        for i in tqdm(range(self.steps), desc=f"{self.name} sampling", disable=not progress):
            t, t_next = times[i], times[i + 1]
            d = v(x, t)
            x_next = x + (t_next - t) * d
            if self.solver == "heun" and i + 1 < self.steps:
                x_next = x + (t_next - t) * 0.5 * (d + v(x_next, t_next))
            x = x_next
        return x

    @staticmethod
    def _report(
        on_step: StepHook, schedule: NoiseSchedule, x: Tensor, t: float, x0: Tensor
    ) -> None:
        """The step hook in the other samplers' terms: sigma = t / (1 - t), its nearest
        timestep, and x_t in the variance-preserving scale, x (1 + sigma) / sqrt(1 + sigma^2)."""
        sigma = t / (1 - t) if t < 1 else float(schedule.sigma_range()[1])
        step = int(schedule.t_for_sigma(torch.tensor([sigma]), nearest=True)[0])
        on_step(step, x * (1 + sigma) / (1 + sigma**2) ** 0.5, x0)
