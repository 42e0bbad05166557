"""Startup checks of every user-facing config value, before anything is built or written.

Each rule names a key, what the value must be, and raises ``ConfigError`` with one line
naming the key, the value given and what is allowed. The constructors behind ``_target_``
nodes check their own arguments too; these rules come first so that wrong types (Hydra
reads ``data.batch_size=abc`` as a string) and cross-key combinations are caught in words.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ddpm.diffusion.samplers.edm import SIGMA_TO_T
from ddpm.nets.unet import INITS
from ddpm.training.precision import run_device

PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "16", "bf16-mixed", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
METRICS = ("val/loss", "val/fid", "val/kid")
_MISSING = object()


class ConfigError(ValueError):
    """A config value that cannot work; the message is the one line shown to the user."""


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool)


Check = Callable[[Any], bool]

# key -> (test, what is allowed). A key that is absent from the config is not checked.
RULES: dict[str, tuple[Check, str]] = {
    "seed": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0, or null"),
    "val_seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "trainer.max_steps": (
        lambda v: _is_int(v) and (v >= 1 or v == -1),
        "an integer >= 1 (or -1: no limit)",
    ),
    "trainer.max_epochs": (
        lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
        "an integer >= 1, -1 or null",
    ),
    "trainer.val_check_interval": (
        lambda v: (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
        "a number of steps >= 1, or a fraction of an epoch in (0, 1]",
    ),
    "trainer.log_every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (
        lambda v: v is None or (_is_num(v) and v >= 0),
        "a number >= 0, or null (no clipping)",
    ),
    "trainer.gradient_clip_algorithm": (lambda v: v in ("norm", "value"), "norm or value"),
    "trainer.num_nodes": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.devices": (
        lambda v: (
            v == "auto"
            or (_is_int(v) and (v >= 1 or v == -1))
            or (isinstance(v, Sequence | ListConfig) and not isinstance(v, str) and len(v) > 0)
        ),
        "an integer >= 1, -1 (all), auto, or a list of device ids",
    ),
    "trainer.accelerator": (lambda v: v in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
    "trainer.precision": (
        lambda v: str(v) in PRECISIONS,
        "32-true, 16-mixed (CUDA), bf16-mixed or auto (the precision= group)",
    ),
    "trainer.deterministic": (lambda v: v in (True, False, "warn"), "true, false or warn"),
    "data.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (per device)"),
    "data.global_batch_size": (
        lambda v: v is None or (_is_int(v) and v >= 1),
        "an integer >= 1 (the batch summed over devices, nodes and accumulation), or null",
    ),
    "data.num_workers": (
        lambda v: v is None or (_is_int(v) and v >= 0),
        "an integer >= 0, or null (none in memory, else the CPUs of each device's share)",
    ),
    "data.image_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.val_fraction": (
        lambda v: _is_num(v) and 0 <= v < 1,
        "a number in [0, 1) (0: train on every image, validate on data.val_size of them)",
    ),
    "data.val_size": (
        lambda v: v is None or (_is_int(v) and v >= 1),
        "an integer >= 1, or null (1,000)",
    ),
    "model.base_channels": (
        lambda v: _is_int(v) and v >= 4 and v % 2 == 0,
        "an even integer >= 4 (the time embedding needs two frequencies)",
    ),
    "model.init": (lambda v: v in INITS, f"one of {', '.join(INITS)} (ho: Ho et al. 2020's)"),
    "model.num_res_blocks": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "model.channel_mults": (
        lambda v: (
            isinstance(v, Sequence | ListConfig)
            and len(v) > 0
            and all(_is_int(m) and m >= 1 for m in v)
        ),
        "a non-empty list of integers >= 1, e.g. [1, 2, 2]",
    ),
    "model.dropout": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "schedule.num_timesteps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (e.g. 1000)"),
    "optimizer.lr": (lambda v: _is_num(v) and v > 0, "a number > 0 (e.g. 2e-4)"),
    "optimizer.weight_decay": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "optimizer.betas": (
        lambda v: (
            isinstance(v, Sequence | ListConfig)
            and len(v) == 2
            and all(_is_num(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    "optimizer.eps": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "optimizer.fused": (lambda v: v in (True, False, None), "true, false or null"),
    "lr_scheduler.total_iters": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "lr_scheduler.start_factor": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "lr_scheduler.warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "lr_scheduler.final_factor": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "callbacks.ema.decay": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "callbacks.ema.update_every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "callbacks.ema.snapshot_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "callbacks.checkpoint.monitor": (
        lambda v: v is None or v in METRICS,
        f"one of {', '.join(METRICS)}, or null",
    ),
    "callbacks.checkpoint.mode": (lambda v: v in ("min", "max"), "min or max"),
    "callbacks.checkpoint.save_top_k": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "callbacks.sample_grid.num_samples": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "callbacks.sample_grid.seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "callbacks.sample_grid.trajectory_samples": (
        lambda v: _is_int(v) and v >= 0,
        "an integer >= 0 (0: no trajectory strip)",
    ),
    "callbacks.sample_grid.trajectory_frames": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "callbacks.sample_grid.guidance_scale": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "callbacks.loss_by_timestep.num_buckets": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "callbacks.checkpoint.save_last": (lambda v: v in (True, False), "true or false"),
    "eval.num_samples": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "eval.seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "eval.kid_subsets": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval.kid_subset_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval.guidance_scale": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "data.split_seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data.channels": (lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    "objective.cond_drop_prob": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "objective.min_snr_gamma": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "objective.preconditioning.sigma_data": (
        lambda v: _is_num(v) and v > 0,
        "a number > 0 (the data's standard deviation; EDM: 0.5)",
    ),
    "objective.preconditioning.p_mean": (lambda v: _is_num(v), "a number (EDM: -1.2)"),
    "objective.preconditioning.p_std": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 1.2)"),
    "schedule.sigma_min": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 0.002)"),
    "schedule.sigma_max": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 80)"),
    "schedule.rho": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 7)"),
    "sampler.sigma_min": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 0.002)"),
    "sampler.sigma_max": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 80)"),
    "sampler.rho": (lambda v: _is_num(v) and v > 0, "a number > 0 (EDM: 7)"),
    "sampler.s_churn": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (0: no churn)"),
    "sampler.s_min": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "sampler.s_max": (lambda v: v is None or (_is_num(v) and v >= 0), "a number >= 0, or null"),
    "sampler.s_noise": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (EDM: 1)"),
    "sampler.sigma_to_t": (lambda v: v in SIGMA_TO_T, f"one of {', '.join(SIGMA_TO_T)}"),
    "augment.p": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1] (EDM: 0.12)"),
    **{
        f"augment.{key}": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (a multiplier of p)")
        for key in ("xflip", "yflip", "rotate_int", "translate_int", "scale", "scale_std")
    },
    "augment.translate_int_max": (lambda v: _is_num(v) and 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "trainer.num_sanity_val_steps": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "trainer.benchmark": (lambda v: v in (True, False, None), "true, false or null"),
    "eval.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval.every_n_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval.reference_split": (lambda v: v in ("train", "val", "all"), "train, val or all"),
    "trainer_guard.nonfinite": (lambda v: v in ("stop", "skip"), "stop or skip"),
    "trainer_guard.check_every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "compile_backend": (
        lambda v: v in torch._dynamo.list_backends(exclude_tags=()),
        "a torch.compile backend: inductor, aot_eager, eager, cudagraphs, ...",
    ),
    "optimized_metric": (
        lambda v: v is None or (isinstance(v, str) and v.startswith(("val/", "train/"))),
        "a logged metric such as val/loss or val/fid, or null",
    ),
}


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _MISSING
        node = node[part]
    return node


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first value (or combination) that cannot work."""
    for key, (test, allowed) in RULES.items():
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={_show(value)} is not allowed: it must be {allowed}")
    _check_combinations(cfg)


def _check_combinations(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible; "
            "use trainer=cpu (or trainer.accelerator=auto)"
        )
    on_cpu = run_device(accelerator) == "cpu"
    precision = str(trainer.get("precision", "32-true"))
    if on_cpu and precision in ("16-mixed", "16"):
        raise ConfigError(
            f"precision={precision} needs a CUDA GPU (fp16 autocast with loss scaling); "
            "on the CPU use precision=bf16-mixed or precision=32-true"
        )
    inductor = cfg.get("compile_backend", "inductor") == "inductor"
    if cfg.get("compile") is True and inductor and on_cpu and not _cxx_compiler():
        raise ConfigError(
            "compile=true on the CPU needs a C++ compiler for TorchInductor and none was "
            "found (g++, clang++ or $CXX); install one or set compile=false"
        )
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    monitor = checkpoint.get("monitor")
    if monitor in ("val/fid", "val/kid") and cfg.get("eval") is None:
        raise ConfigError(
            f"callbacks.checkpoint.monitor={monitor} needs FID during training; "
            "drop eval=null or monitor val/loss"
        )
    metric = cfg.get("optimized_metric")
    if metric in ("val/fid", "val/kid") and cfg.get("eval") is None:
        raise ConfigError(
            f"optimized_metric={metric} needs FID during training; drop eval=null or "
            "optimize val/loss"
        )
    schedule = cfg.get("lr_scheduler") or {}
    cosine = str(schedule.get("_target_", "")).endswith("WarmupCosine")
    if cosine and schedule.get("total_steps") is None and int(trainer.get("max_steps", -1)) < 1:
        raise ConfigError(
            f"lr_scheduler=cosine decays to the last step, but trainer.max_steps="
            f"{trainer.get('max_steps', -1)} sets none; give trainer.max_steps, or use "
            "lr_scheduler=constant for an epoch-bound run"
        )
    guard = cfg.get("trainer_guard") or {}
    optimizer = cfg.get("optimizer") or {}
    if guard.get("nonfinite") == "skip" and not precision.startswith("16"):
        target = str(optimizer.get("_target_", ""))
        fusable = target.rsplit(".", 1)[-1] in ("Adam", "AdamW", "SGD", "Adagrad")
        if not (fusable and optimizer.get("fused")):
            raise ConfigError(
                "trainer_guard.nonfinite=skip needs a fused optimizer, which skips a step on "
                f"the device (optimizer._target_={target}, optimizer.fused="
                f"{_show(optimizer.get('fused'))}); use AdamW with optimizer.fused=true"
            )


def _cxx_compiler() -> str | None:
    """The C++ compiler TorchInductor would use for CPU code, if one is installed."""
    candidates = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)
