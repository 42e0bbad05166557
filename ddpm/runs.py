"""Preparing a training run: every check and every object, before anything is written.

``prepare(cfg)`` resolves the config (resume, seed), validates every value, checks the
checkpoint to continue from and the output folder, then builds data, module, loggers,
callbacks and Trainer. It writes nothing. ``PrepareFirst`` is a Hydra callback that runs it
before Hydra creates the run folder, so a bad config leaves no trace on disk; ``train``
then picks up the prepared run instead of building it twice.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.build import UsageError, build_callbacks, build_module, fail, user_error
from ddpm.callbacks import SampleQuality
from ddpm.checkpoints import AtomicCheckpointIO, check_fits, read_checkpoint
from ddpm.guards import TrainerGuard
from ddpm.loggers import build_loggers
from ddpm.module import DiffusionModule
from ddpm.precision import precision_plugin
from ddpm.resume import apply_resume
from ddpm.validation import validate_config

_SEED_ENV = "DDPM_RUN_SEED"


class RunComplete(Exception):
    """``resume=auto`` found the run already finished (a requeued job): exit 0."""


@dataclass
class Prepared:
    """A run ready to fit: its final config and every object ``trainer.fit`` needs."""

    cfg: DictConfig
    datamodule: L.LightningDataModule
    module: DiffusionModule
    trainer: L.Trainer
    loggers: list[Any]
    ckpt_path: str | None
    resumed_step: int | None = None
    guard: TrainerGuard | None = None


def check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written, naming it."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write the run folder {folder}: {probe} is not a writable directory; "
            "choose another with hydra.run.dir=DIR (or paths.log_dir=DIR)"
        )


def prepare(
    cfg: DictConfig, overrides: list[str] | None = None, groups: set[str] | None = None
) -> Prepared:
    """Resolve, validate and build a training run from ``cfg`` (writes nothing)."""
    cfg = apply_resume(cfg, overrides or [], groups or set())
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    with open_dict(cfg):
        if cfg.get("seed") is None:  # a fresh seed, recorded in the config and checkpoint;
            # DDP ranks started by Lightning inherit rank 0's through the environment
            child = os.environ.get("LOCAL_RANK", "0") != "0"
            launched = max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "SLURM_NTASKS"))
            if launched > 1 and not os.environ.get(_SEED_ENV):
                raise UsageError(
                    f"seed=null draws a seed in each process, and the {launched} processes "
                    "started by torchrun/srun would each draw their own (different weights and "
                    "overlapping data shards); set seed=N, the same on every node"
                )
            seed = (child and os.environ.get(_SEED_ENV)) or random.SystemRandom().randrange(2**31)
            os.environ[_SEED_ENV] = str(seed)
            cfg.seed = int(seed)
            cfg.data.shuffle_seed = cfg.seed
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path, run_ids, step = cfg.get("ckpt_path"), {}, None
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
        check_fits(Path(ckpt_path), ckpt["hyper_parameters"]["config"], OmegaConf.to_container(cfg))
        run_ids, step = ckpt.get("logger_run_ids") or {}, int(ckpt.get("global_step", 0))
        del ckpt
        max_steps = int(cfg.trainer.get("max_steps", -1))
        if 0 < max_steps <= step and cfg.get("resume") == "auto":
            raise RunComplete(
                f"the run in {cfg.paths.output_dir} is complete (step {step}, "
                f"trainer.max_steps={max_steps}): nothing to do"
            )
        if 0 < max_steps <= step:
            raise UsageError(
                f"{ckpt_path} is at step {step}, and trainer.max_steps={max_steps}: nothing "
                f"to train; pass a larger trainer.max_steps (e.g. trainer.max_steps={2 * step})"
            )
    check_writable(Path(cfg.paths.output_dir))
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # fail on bad data before any training starts
    if datamodule.conditional:
        with open_dict(cfg):  # the net's class count comes from the data, stored with it
            cfg.model.num_classes = datamodule.num_classes
    module = build_module(cfg)
    loggers = build_loggers(cfg.get("logger"), group=_multirun_group(), run_ids=run_ids)
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    guard = next((cb for cb in callbacks if isinstance(cb, TrainerGuard)), None)
    if guard is None:  # configs written before the guard existed still get one
        guard = TrainerGuard()
        callbacks.append(guard)
    for callback in callbacks:
        if isinstance(callback, SampleQuality):
            callback.load_extractor(datamodule)  # a missing download fails here, at once
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    plugins: list[Any] = [AtomicCheckpointIO()]
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    mixed = precision_plugin(str(trainer_cfg.get("precision")), accelerator)
    if mixed is not None:  # the plugin carries the precision; Lightning takes one of the two
        plugins.append(mixed)
        trainer_cfg.pop("precision")
    trainer: L.Trainer = instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=loggers,
        plugins=plugins,
        # The data module shards and orders the training batches itself (ddpm.batches: a
        # function of the step, so resumes are exact); Lightning must not replace them.
        use_distributed_sampler=False,
    )
    return Prepared(cfg, datamodule, module, trainer, loggers, ckpt_path, step, guard)


def _multirun_group() -> str | None:
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def hydra_overrides() -> tuple[list[str], set[str]]:
    """The task's command-line overrides and the names of the config groups."""
    if not HydraConfig.initialized():
        return [], set()
    hc = HydraConfig.get()
    return list(hc.overrides.task), set(hc.runtime.choices.keys())


_PREPARED: dict[str, Any] = {}


def take_prepared(cfg: DictConfig) -> Any:
    """The run ``PrepareFirst`` built for this very config, if any (used once)."""
    return _PREPARED.pop(_fingerprint(cfg), None)


def _fingerprint(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=False)


class PrepareFirst(HydraCallback):
    """Hydra callback: prepare a single run before Hydra writes its folder.

    Hydra creates the run folder and writes ``.hydra/`` and the log before it calls the
    task; preparing here instead means a bad value stops the run with one line and an
    empty disk. ``task`` is ``train`` or ``sample``. (In ``-m`` sweeps each job is
    prepared inside its own task.)
    """

    def __init__(self, task: str = "train") -> None:
        self.task = task

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        with open_dict(task):
            del task["hydra"]
        key = _fingerprint(task)
        try:
            if self.task == "sample":
                from ddpm.cli import prepare_sample  # here: ddpm.cli imports this module

                _PREPARED[key] = prepare_sample(task)
                return
            with open_dict(task):
                run_folder = OmegaConf.select(config, "hydra.run.dir")
                task.paths.output_dir = os.path.abspath(str(run_folder))
            overrides = list(config.hydra.overrides.task)
            groups = set(config.hydra.runtime.choices.keys())
            _PREPARED[key] = prepare(task, overrides, groups)
        except RunComplete as done:
            print(done, file=sys.stderr)
            raise SystemExit(0) from None
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            fail(message)
