"""The training loss: a small callable that samples timesteps and noise, builds x_t and
returns one loss per sample (reduction is the caller's choice)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm.rng import index_generator
from ddpm.schedules import PREDICTION_TYPES, NoiseSchedule

Model = Callable[[Tensor, Tensor], Tensor]


class DiffusionLoss:
    """Simplified DDPM loss L_simple = E_{t, x_0, eps} ||target - f_theta(x_t, t)||^2
    (Ho et al. 2020, Eq. 14), with t ~ U{0, ..., T-1}.

    With ``prediction_type="epsilon"`` the target is the noise eps, exactly the paper's
    loss; ``sample`` and ``v_prediction`` regress x_0 or v instead.
    """

    def __init__(self, prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"objective.prediction_type={prediction_type!r} is unknown; "
                f"choose one of {list(PREDICTION_TYPES)}"
            )
        self.prediction_type = prediction_type

    def __call__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-sample loss, shape [B]. ``t`` and ``noise`` are drawn when not given."""
        if t is None:
            t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = schedule.q_sample(x0, t, noise)
        target = schedule.target(x0, noise, t, self.prediction_type)
        # The regression is done in float32 even under autocast (fp16 squares overflow).
        err = (model(x_t, t).float() - target.float()) ** 2
        return err.flatten(1).mean(dim=1)  # [B, C, H, W] -> [B]


def fixed_timesteps_and_noise(
    indices: Sequence[int] | Tensor,
    shape: Sequence[int],
    num_timesteps: int,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """A timestep and a noise image that depend only on each sample's dataset index.

    Validation uses them so that ``val/loss`` is computed on the same (x_0, t, eps)
    triples every epoch, whatever the batch size or the number of processes.
    Returns CPU tensors t [B] (int64) and noise [B, *shape].
    """
    ts, noises = [], []
    for index in torch.as_tensor(indices).tolist():
        g = index_generator(seed, int(index))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.cat(ts), torch.stack(noises)
