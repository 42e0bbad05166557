"""The training loss: a small callable that samples timesteps and noise, builds x_t and
returns one loss per sample (reduction is the caller's choice)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm.diffusion.rng import index_generator
from ddpm.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule

Model = Callable[[Tensor, Tensor], Tensor]


WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weight(snr: Tensor, prediction_type: str, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Eq. 8 and Sec. 3.4).

    The x_0 loss weighted by min(SNR, gamma) is, in each parameterisation's own MSE:
    epsilon: ||eps err||^2 = SNR ||x_0 err||^2            -> weight min(SNR, gamma) / SNR;
    sample:  the x_0 MSE itself                            -> weight min(SNR, gamma);
    v:       ||v err||^2 = (SNR + 1) ||x_0 err||^2         -> weight min(SNR, gamma) / (SNR + 1).
    """
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1.0)


class DiffusionLoss:
    """Simplified DDPM loss L_simple = E_{t, x_0, eps} w(t) ||target - f_theta(x_t, t)||^2
    (Ho et al. 2020, Eq. 14), with t ~ U{0, ..., T-1}.

    With ``prediction_type="epsilon"`` and ``weighting="uniform"`` (w = 1) it is exactly
    the paper's loss; ``sample`` and ``v_prediction`` regress x_0 or v instead, and
    ``weighting="min_snr"`` applies Hang et al. 2023's min(SNR, ``min_snr_gamma``) weight
    expressed for the chosen prediction type.
    """

    def __init__(
        self,
        prediction_type: str = "epsilon",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        cond_drop_prob: float = 0.1,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"objective.prediction_type={prediction_type!r} is unknown; "
                f"choose one of {list(PREDICTION_TYPES)}"
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"objective.weighting={weighting!r} is unknown; choose one of {list(WEIGHTINGS)}"
            )
        if not float(min_snr_gamma) > 0:
            raise ValueError(
                f"objective.min_snr_gamma={min_snr_gamma!r} must be > 0 (Hang et al. use 5)"
            )
        if not 0.0 <= float(cond_drop_prob) < 1.0:
            raise ValueError(
                f"objective.cond_drop_prob={cond_drop_prob!r} must lie in [0, 1) (0.1 in Ho & "
                "Salimans 2022)"
            )
        self.prediction_type = prediction_type
        self.cond_drop_prob = float(cond_drop_prob)
        self.weighting = weighting
        self.min_snr_gamma = float(min_snr_gamma)

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Refuse a schedule this objective cannot train: with zero terminal SNR, an
        epsilon network's x_0 = (x_T - eps) / 0 is undefined at t = T-1 (Lin et al. 2023,
        Sec. 3.2), and min-SNR's weight min(SNR, gamma) / (SNR + 1) (or min(SNR, gamma)) is
        0 there: the prediction every chain starts from would never be trained."""
        if schedule.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "schedule.zero_terminal_snr=true needs objective.prediction_type="
                "v_prediction (or sample): an epsilon network cannot recover x_0 at zero SNR"
            )
        if schedule.zero_terminal_snr and self.weighting == "min_snr":
            raise ValueError(
                "objective.weighting=min_snr gives t = T-1 zero weight under "
                "schedule.zero_terminal_snr=true (SNR 0 there), yet sampling starts at "
                "T-1 from that untrained prediction; use objective.weighting=uniform"
            )

    def __call__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        y: Tensor | None = None,
        drop_labels: bool = True,
    ) -> Tensor:
        """Per-sample loss, shape [B]. ``t`` and ``noise`` are drawn when not given.

        ``y`` (class labels, conditional nets only) is replaced by -1 ("no label") with
        probability ``cond_drop_prob`` when ``drop_labels``, so one network learns the
        conditional and the unconditional prediction (Ho & Salimans 2022, Algorithm 1)."""
        if t is None:
            t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = schedule.q_sample(x0, t, noise)
        target = schedule.target(x0, noise, t, self.prediction_type)
        # The regression is done in float32 even under autocast (fp16 squares overflow).
        if y is None:
            out = model(x_t, t)
        else:
            if drop_labels and self.cond_drop_prob > 0:
                drop = torch.rand(y.shape, device=y.device) < self.cond_drop_prob
                y = torch.where(drop, torch.full_like(y, -1), y)
            out = model(x_t, t, y=y)
        err = (out.float() - target.float()) ** 2
        loss = err.flatten(1).mean(dim=1)  # [B, C, H, W] -> [B]
        if self.weighting == "min_snr":
            loss = loss * min_snr_weight(
                schedule.snr(t).float(), self.prediction_type, self.min_snr_gamma
            )
        return loss


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
