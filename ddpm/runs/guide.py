"""Autoguidance's guide for ``sample.py`` (Karras et al. 2024, "Guiding a Diffusion Model
with a Bad Version of Itself"): ``guide_ckpt=PATH`` (another run: a smaller net, a
shorter run) and/or ``guide_step=N`` (an earlier state, rebuilt from the power-EMA
snapshots), with the guide's own EMA length ``guide_ema_std=S`` and the weight
``guide_weight=W`` (1: unguided). The guide is refused in one line unless it denoises the
same task the same way: data shape, classes, objective, preconditioning, noise grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ddpm.runs.build import load_module
from ddpm.runs.errors import UsageError
from ddpm.runs.posthoc import checkpoint_step, posthoc_ema
from ddpm.training.module import DiffusionModule
from ddpm.training.posthoc_ema import check_sigma_rel

# what a loss draws in training only, not what its sampling model computes
_TRAINING_ONLY = {
    "p_mean",
    "p_std",
    "cond_drop_prob",
    "time_sampling",
    "logit_mean",
    "logit_std",
    "shift",
    "min_snr_gamma",
    "weighting",
    "learned_weighting",
    "uncertainty",
}


def sampling_signature(module: DiffusionModule) -> dict[str, Any]:
    """What a module's sampling model depends on besides its net: the objective's class
    and prediction type, and its (and its preconditioning's) sampling-time settings."""

    def settings(obj: object) -> dict[str, Any]:
        return {
            k: v
            for k, v in sorted(vars(obj).items())
            if not k.startswith("_")
            and k not in _TRAINING_ONLY
            and isinstance(v, (bool, int, float, str))
        }

    objective = module.objective
    signature = {
        "objective": type(objective).__name__,
        "prediction_type": objective.prediction_type,
        **settings(objective),
    }
    preconditioning = getattr(objective, "preconditioning", None)
    if preconditioning is not None:
        signature["preconditioning"] = {
            "name": type(preconditioning).__name__,
            **settings(preconditioning),
        }
    return signature


def check_guide(main: DiffusionModule, guide: DiffusionModule, source: Path) -> None:
    """Refuse in one line a guide that does not denoise the main model's task the same way
    (its outputs could not be combined with the main model's)."""
    where = f"the guide {source}"
    if tuple(guide.image_shape) != tuple(main.image_shape):
        raise UsageError(
            f"{where} draws images of shape {list(guide.image_shape)}, the checkpoint "
            f"{list(main.image_shape)}: a guide must be trained on the same data"
        )
    if guide.num_classes != main.num_classes:
        raise UsageError(
            f"{where} has {guide.num_classes} classes, the checkpoint {main.num_classes}: "
            "guide a class-conditional model with a class-conditional one (and unconditional "
            "with unconditional)"
        )
    ours, theirs = sampling_signature(main), sampling_signature(guide)
    if ours != theirs:
        key = next(k for k in {**ours, **theirs} if ours.get(k) != theirs.get(k))
        raise UsageError(
            f"{where} has another {'preconditioning' if key == 'preconditioning' else 'objective'}"
            f" ({key}: {theirs.get(key)} vs the checkpoint's {ours.get(key)}): a guide must "
            "be trained with the same objective and preconditioning"
        )
    grid_ours = main.schedule.alphas_cumprod.double().cpu()
    grid_theirs = guide.schedule.alphas_cumprod.double().cpu()
    if grid_ours.shape != grid_theirs.shape or not torch.equal(grid_ours, grid_theirs):
        raise UsageError(
            f"{where} has another noise schedule (its timesteps mean other noise levels): "
            "a guide must be trained with the same schedule"
        )


def guide_weight(cfg: DictConfig) -> float:
    """``guide_weight`` as a float: finite and >= 0 (1 = unguided), else a UsageError."""
    value = cfg.get("guide_weight", 1.0)
    value = 1.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        value = -1.0
    if value < 0:
        raise UsageError(
            f"guide_weight={cfg.get('guide_weight')!r} is not allowed: it must be a number >= 0 "
            "(1: no guidance; Karras et al. 2024 use 1.2-3)"
        )
    return float(value)


def load_guide(
    cfg: DictConfig, main: DiffusionModule
) -> tuple[DiffusionModule | None, dict[str, Any] | None]:
    """The guide ``cfg`` asks for (checked against ``main``) and what was used, or
    (None, None) when no guide is given. ``guide_step=N`` rebuilds the EMA of length
    ``guide_ema_std`` (default: the length the run's checkpoints hold) at step N from the
    snapshots of ``guide_ckpt``'s run (default: ``ckpt_path``'s); ``guide_ckpt`` alone is
    that checkpoint's weights, or with ``guide_ema_std`` the EMA of that length at its
    step."""
    weight = guide_weight(cfg)
    path, step, std = cfg.get("guide_ckpt"), cfg.get("guide_step"), cfg.get("guide_ema_std")
    if path is None and step is None:
        if std is not None or weight != 1.0:
            raise UsageError(
                "guide_weight and guide_ema_std need a guide: add guide_ckpt=PATH (a smaller or "
                "shorter run) and/or guide_step=N (an earlier state of this run)"
            )
        return None, None
    if std is not None:
        try:
            std = check_sigma_rel(std, "guide_ema_std")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    source = Path(path) if path is not None else Path(cfg.ckpt_path)
    if not source.is_file():
        raise UsageError(f"guide_ckpt={path!r} is not a file: give a checkpoint (.ckpt)")
    guide = load_module(source)
    check_guide(main, guide, source)
    at = checkpoint_step(source)
    record: dict[str, Any] = {}
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= at:
            raise UsageError(
                f"guide_step={step!r} is not allowed: it must be an optimizer step in "
                f"1..{at} (the guide checkpoint's step), e.g. {max(1, at // 8)} for T/8"
            )
        if std is None:  # the length the run validated and saved its checkpoints with
            stds = ((guide.hparams.config.get("callbacks") or {}).get("ema") or {}).get("stds")
            if not stds:
                raise UsageError(
                    f"guide_step needs EMA snapshots, and {source} was not trained with "
                    "ema=power: use guide_ckpt=PATH of an earlier checkpoint instead"
                )
            std = float(stds[0])
        record = _rebuilt(guide, source, std, step)
    elif std is not None:
        record = _rebuilt(guide, source, std, at)
    record |= {"ckpt_path": str(source.resolve()), "ckpt_step": at}
    record |= {"guide_step": step, "guide_ema_std": std, "weight": weight}
    return guide.eval(), record


def _rebuilt(guide: DiffusionModule, source: Path, std: float, step: int) -> dict[str, Any]:
    """``posthoc_ema`` into the guide, its refusals (no snapshots, a step before the first
    one) named as the guide's."""
    try:
        return posthoc_ema(guide, source, std, step)
    except (ValueError, UsageError) as exc:
        raise UsageError(f"the guide (guide_step/guide_ema_std): {exc}") from None
