"""The training losses: small callables that draw noise levels and noise, build the noisy
image and return one loss per sample (reduction is the caller's choice).

Both share one interface, which the LightningModule and its callbacks rely on:
``loss(model, schedule, x0, level, noise, y=..., drop_labels=..., aug=...)`` with ``level``
a timestep (``DiffusionLoss``) or a noise level sigma (``EDMLoss``); ``fixed_levels`` (the
validation draws, a function of each image's index); ``bucket``/``bucket_labels`` (the
loss-by-noise-level chart); ``sampling_model`` (what the samplers call) and
``prediction_type`` (what that model predicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm.diffusion.preconditioning import PreconditionedModel, Preconditioning
from ddpm.diffusion.rng import index_generator
from ddpm.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from ddpm.diffusion.weighting import UncertaintyWeighting

Model = Callable[..., Tensor]  # model(x, t_or_c_noise[, y=labels][, aug=augment labels])


def step_share(draws: tuple[Tensor, ...], share: tuple[int, int]) -> tuple[Tensor, ...]:
    """Micro-batch ``i`` of ``k``'s slice of draws made for a whole training step (k x B
    samples, first dimension): k micro-batches of B then see what one batch of k x B sees,
    so gradient accumulation gives the large batch's update."""
    i, k = share
    n = draws[0].shape[0] // k
    return tuple(d[i * n : (i + 1) * n] for d in draws)


def step_draws(
    x0: Tensor, share: tuple[int, int], levels: Callable[[int], Tensor]
) -> tuple[Tensor, Tensor]:
    """Micro-batch ``share`` = (i, k)'s noise levels [B] and unit noise, drawn for the whole
    training step of k x B samples: ``levels(k B)`` first, then the noise (``step_share``).
    Every objective draws in this one order, so accumulated micro-batches see what one
    large batch sees."""
    n = x0.shape[0] * share[1]
    level = levels(n)
    noise = torch.randn((n, *x0.shape[1:]), device=x0.device, dtype=x0.dtype)
    return step_share((level, noise), share)


def loss_inputs(
    x0: Tensor,
    level: Tensor | None,
    noise: Tensor | None,
    y: Tensor | None,
    drop_prob: float,
    levels: Callable[[int], Tensor],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """What a loss call draws where it is not given, in this one order for every
    objective: the noise levels [B] (``levels(B)``), then unit noise like ``x0``, then
    each label dropped to -1 with probability ``drop_prob`` (0: the labels as given)."""
    if level is None:
        level = levels(x0.shape[0])
    if noise is None:
        noise = torch.randn_like(x0)
    if y is not None and drop_prob > 0:
        y = drop_labels_at_random(y, drop_prob)
    return level, noise, y


def drop_labels_at_random(y: Tensor, prob: float) -> Tensor:
    """Replace each label by -1 ("no label") with probability ``prob``, so one network
    learns the conditional and the unconditional prediction (Ho & Salimans 2022, Alg. 1)."""
    drop = torch.rand(y.shape, device=y.device) < prob
    return torch.where(drop, torch.full_like(y, -1), y)


def conditioning(y: Tensor | None, aug: Tensor | None) -> dict[str, Tensor]:
    """The keyword arguments a net takes besides (x, t): labels and augmentation labels,
    only those given, so unconditional nets without augmentation keep their (x, t) call."""
    return {k: v for k, v in (("y", y), ("aug", aug)) if v is not None}


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

    def sampling_model(self, net: Model, schedule: NoiseSchedule) -> Model:
        """What the samplers call: the net itself, which predicts ``prediction_type``."""
        return net

    def draw(
        self, x0: Tensor, schedule: NoiseSchedule, share: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, Tensor]:
        """The timesteps [B] and noise of micro-batch ``share`` = (i, k) of a training step,
        drawn as ``__call__`` draws them, for k x B samples (``step_share``)."""
        return step_draws(x0, share, self._levels(x0, schedule))

    def _levels(self, x0: Tensor, schedule: NoiseSchedule) -> Callable[[int], Tensor]:
        """n training timesteps, uniform over the schedule's, on ``x0``'s device."""
        return lambda n: torch.randint(0, schedule.num_timesteps, (n,), device=x0.device)

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
        """Per-sample loss, shape [B]. ``t`` and ``noise`` are drawn when not given.

        ``y`` (class labels, conditional nets only) is dropped with probability
        ``cond_drop_prob`` when ``drop_labels``; ``aug`` [B, A] are the augmentation labels
        of ``x0`` (non-leaky augmentation, Karras et al. 2022, App. D.2)."""
        t, noise, y = loss_inputs(
            x0, t, noise, y, self.cond_drop_prob if drop_labels else 0.0, self._levels(x0, schedule)
        )
        x_t = schedule.q_sample(x0, t, noise)
        target = schedule.target(x0, noise, t, self.prediction_type)
        out = model(x_t, t, **conditioning(y, aug))
        # The regression is done in float32 even under autocast (fp16 squares overflow).
        err = (out.float() - target.float()) ** 2
        loss = err.flatten(1).mean(dim=1)  # [B, C, H, W] -> [B]
        if self.weighting == "min_snr":
            loss = loss * min_snr_weight(
                schedule.snr(t).float(), self.prediction_type, self.min_snr_gamma
            )
        return loss

    def fixed_levels(
        self,
        indices: Sequence[int] | Tensor,
        shape: Sequence[int],
        schedule: NoiseSchedule,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Validation's (t, noise) per image index (``fixed_timesteps_and_noise``)."""
        return fixed_timesteps_and_noise(indices, shape, schedule.num_timesteps, seed)

    level_name = "t"

    def bucket(self, t: Tensor, num_buckets: int, schedule: NoiseSchedule) -> Tensor:
        """The chart bucket of each timestep: ``num_buckets`` equal ranges of t."""
        return t * num_buckets // schedule.num_timesteps

    def bucket_labels(self, num_buckets: int, schedule: NoiseSchedule) -> list[str]:
        """``lo-hi`` timestep range of each bucket, as in the metric names."""
        T = schedule.num_timesteps
        return [
            f"{i * T // num_buckets:04d}-{(i + 1) * T // num_buckets - 1:04d}"
            for i in range(num_buckets)
        ]


class EDMLoss:
    """The denoising loss of Karras et al. 2022 (Eq. 2 with Table 1's "Training" rows):
    E_{sigma, y, n} lambda(sigma) ||D(y + n; sigma) - y||^2, n ~ N(0, sigma^2 I), with the
    preconditioned denoiser D and the sigma distribution and weight lambda of the chosen
    ``preconditioning`` column (EDM: ln sigma ~ N(-1.2, 1.2^2), lambda = (sigma^2 +
    sigma_data^2) / (sigma sigma_data)^2). Sigma is continuous; the run's schedule is only
    the grid the discrete samplers (DDPM, DDIM, DPM-Solver) walk at sampling time.

    ``learned_weighting``: EDM2's loss lambda / e^u ||D - y||^2 + u with a learned u(sigma)
    (``ddpm.diffusion.weighting``) while training; validation keeps the fixed weighting.
    """

    prediction_type = "sample"  # the samplers see D(x; sigma): an x_0 estimate
    level_name = "sigma"

    def __init__(
        self,
        preconditioning: Preconditioning,
        cond_drop_prob: float = 0.1,
        learned_weighting: bool = False,
        weighting_channels: int = 128,
    ) -> None:
        if not isinstance(preconditioning, Preconditioning):
            raise ValueError(
                f"objective.preconditioning={preconditioning!r} must be one of "
                "ddpm.diffusion.preconditioning's EDMPrecond, VPPrecond, VEPrecond, IDDPMPrecond"
            )
        if not 0.0 <= float(cond_drop_prob) < 1.0:
            raise ValueError(
                f"objective.cond_drop_prob={cond_drop_prob!r} must lie in [0, 1) (0.1 in Ho & "
                "Salimans 2022)"
            )
        self.preconditioning = preconditioning
        self.cond_drop_prob = float(cond_drop_prob)
        # EDM2's learned uncertainty u(sigma): trained with the net (DiffusionModule holds
        # it as ``loss_weighting``, so the optimizer and the checkpoint have it)
        self.uncertainty = UncertaintyWeighting(weighting_channels) if learned_weighting else None

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Refuse a sampling grid an EDM-trained net cannot be sampled on: an infinite sigma
        (zero terminal SNR) has no finite VE image x = x_t sqrt(1 + sigma^2)."""
        if schedule.zero_terminal_snr:
            raise ValueError(
                "objective=edm samples on the schedule's sigma grid, and "
                "schedule.zero_terminal_snr=true makes its last sigma infinite; set "
                "schedule.zero_terminal_snr=false (schedule=edm is Karras et al.'s grid)"
            )

    def sampling_model(self, net: Model, schedule: NoiseSchedule) -> Model:
        """The preconditioned denoiser at the schedule's timesteps (predicts x_0)."""
        return PreconditionedModel(net, self.preconditioning, schedule)

    def draw(
        self, x0: Tensor, schedule: NoiseSchedule, share: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, Tensor]:
        """The noise levels [B] and unit noise of micro-batch ``share`` = (i, k) of a
        training step, drawn as ``__call__`` draws them, for k x B samples (``step_share``)."""
        return step_draws(x0, share, self._levels(x0))

    def _levels(self, x0: Tensor) -> Callable[[int], Tensor]:
        """n training noise levels from the preconditioning's distribution, on ``x0``'s
        device."""
        return lambda n: self.preconditioning.sample_sigma(n, device=x0.device)

    def __call__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        x0: Tensor,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        y: Tensor | None = None,
        drop_labels: bool = True,
        aug: Tensor | None = None,
    ) -> Tensor:
        """Per-sample loss [B]; ``sigma`` [B] and unit ``noise`` are drawn when not given."""
        sigma, noise, y = loss_inputs(
            x0, sigma, noise, y, self.cond_drop_prob if drop_labels else 0.0, self._levels(x0)
        )
        noisy = x0.float() + noise.float() * sigma.float().view(-1, *[1] * (x0.ndim - 1))
        denoised = self.preconditioning.denoise(model, noisy, sigma, **conditioning(y, aug))
        err = (denoised - x0.float()).flatten(1).pow(2).mean(dim=1)  # [B, C, H, W] -> [B]
        weighted = self.preconditioning.weight(sigma) * err
        if self.uncertainty is not None and self.uncertainty.training:
            return self.uncertainty.loss(sigma, weighted)  # EDM2 Eq. 21
        return weighted  # validation (eval mode): the fixed weighting, comparable across runs

    def fixed_levels(
        self,
        indices: Sequence[int] | Tensor,
        shape: Sequence[int],
        schedule: NoiseSchedule,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Validation's (sigma [B] float32, noise [B, *shape]) per image index, drawn from
        the training distribution of sigma with the index's own generator (CPU)."""

        def draw(g: torch.Generator) -> Tensor:
            return self.preconditioning.sample_sigma(1, generator=g)

        return per_index_levels_and_noise(indices, shape, draw, seed)

    def _edges(self, num_buckets: int) -> Tensor:
        lo, hi = self.preconditioning.log_sigma_range()
        return torch.linspace(lo, hi, num_buckets + 1, dtype=torch.float64)

    def bucket(self, sigma: Tensor, num_buckets: int, schedule: NoiseSchedule) -> Tensor:
        """The chart bucket of each sigma: ``num_buckets`` equal ranges of ln(sigma) over the
        preconditioning's span, the outermost taking everything beyond."""
        inner = self._edges(num_buckets)[1:-1].to(sigma.device, torch.float32)
        return torch.bucketize(sigma.float().log(), inner)

    def bucket_labels(self, num_buckets: int, schedule: NoiseSchedule) -> list[str]:
        """``lo-hi`` sigma range of each bucket."""
        sig = self._edges(num_buckets).exp().tolist()
        return [f"{sig[i]:.3g}-{sig[i + 1]:.3g}" for i in range(num_buckets)]


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

    def draw(g: torch.Generator) -> Tensor:
        return torch.randint(0, num_timesteps, (1,), generator=g)

    return per_index_levels_and_noise(indices, shape, draw, seed)


def per_index_levels_and_noise(
    indices: Sequence[int] | Tensor,
    shape: Sequence[int],
    draw_level: Callable[[torch.Generator], Tensor],
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """For each dataset index, a noise level ``draw_level(g)`` ([1]) and then a noise image
    of ``shape``, both from that index's own generator: CPU tensors [B] and [B, *shape]."""
    levels, noises = [], []
    for index in torch.as_tensor(indices).tolist():
        g = index_generator(seed, int(index))
        levels.append(draw_level(g))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.cat(levels), torch.stack(noises)
