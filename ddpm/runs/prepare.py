"""Preparing a training run: every check and every object, before anything is written.

``prepare(cfg)`` resolves the config (resume, seed), validates every value, checks the
checkpoint to continue from and the output folder, then builds data, module, loggers,
callbacks and Trainer. It writes nothing (``ddpm.runs.prepare_first`` runs it before Hydra
creates the run folder).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.runs.build import build_callbacks, build_module
from ddpm.runs.checkpoints import AtomicCheckpointIO, check_fits, read_checkpoint
from ddpm.runs.errors import UsageError
from ddpm.runs.loggers import build_loggers
from ddpm.runs.resume import apply_resume
from ddpm.runs.validation import validate_config
from ddpm.training.guards import TrainerGuard
from ddpm.training.module import DiffusionModule
from ddpm.training.precision import precision_plugin
from ddpm.training.sample_quality import SampleQuality

_SEED_ENV = "DDPM_RUN_SEED"
log = logging.getLogger(__name__)


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
    batch_line: str = ""


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


# What says a folder holds a run: its files that a new run there would overwrite or mix
RUN_MARKERS = ("checkpoints/last.ckpt", "checkpoints/*.ckpt", "config.yaml", "ema_snapshots/*.pt")


def check_fresh(folder: Path) -> None:
    """Refuse to start a run in a folder that holds one: a new run there would overwrite
    its checkpoints and config and mix its EMA snapshots. Checked by the first process
    only (the others start once it has written the folder)."""
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    if any(os.environ.get(key, "0") not in ("", "0") for key in ranks) or not folder.is_dir():
        return
    found = next((m for m in RUN_MARKERS if next(folder.glob(m), None) is not None), None)
    if found is not None:
        raise UsageError(
            f"{folder} holds a run already ({found}): continue it with resume={folder}, "
            "or start a new run in a fresh folder (hydra.run.dir=NEW_DIR)"
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
    for note in no_effect_notes(cfg, overrides or []):
        log.warning("note: %s", note)
    check_writable(Path(cfg.paths.output_dir))
    if cfg.get("resume") is None:  # resume= continues the run in its folder
        check_fresh(Path(cfg.paths.output_dir))
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
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1))
    interval = trainer_cfg.get("val_check_interval")
    if accumulate > 1 and isinstance(interval, int):  # Lightning counts micro-batches here
        trainer_cfg["val_check_interval"] = interval * accumulate
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
        # The data module shards and orders the training batches itself (ddpm.data.batches: a
        # function of the step, so resumes are exact); Lightning must not replace them.
        use_distributed_sampler=False,
    )
    batch_line = apply_global_batch(cfg, datamodule, trainer)
    module.hparams["config"]["data"]["batch_size"] = datamodule.batch_size  # the checkpoint's
    return Prepared(cfg, datamodule, module, trainer, loggers, ckpt_path, step, guard, batch_line)


def apply_global_batch(cfg: DictConfig, datamodule: Any, trainer: L.Trainer) -> str:
    """``data.batch_size`` is per device and per micro-batch. A recipe's
    ``data.global_batch_size`` (cifar10_ddpm's 128, cifar10_edm's 512) sets it from the
    device count, so warm-up, EMA length and step counts stay the paper's on any number of
    devices; one that does not divide is refused in one line. Returns the line that says
    how the global batch is made."""
    devices, nodes = trainer.num_devices, trainer.num_nodes
    accumulate = int(trainer.accumulate_grad_batches)
    share = devices * nodes * accumulate
    wanted = getattr(datamodule, "global_batch_size", None)
    if wanted is not None:
        if wanted % share:
            raise UsageError(
                f"data.global_batch_size={wanted} does not divide into {devices} devices x "
                f"{nodes} nodes x {accumulate} accumulation steps = {share} shares: use a "
                f"device count or trainer.accumulate_grad_batches that divides {wanted}, or "
                "data.global_batch_size=null with a per-device data.batch_size"
            )
        datamodule.batch_size = wanted // share
        with open_dict(cfg):
            cfg.data.batch_size = datamodule.batch_size  # what the checkpoint records
    size = datamodule.batch_size
    return (
        f"batch: {size} per device x {devices} devices x {nodes} nodes x {accumulate} "
        f"accumulation = {size * share} global"
    )


def no_effect_notes(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """One line for each choice that likely does not do what the user means: a net made for
    the digits on 64 px images and more, and the schedule group under an EDM objective,
    which draws its training noise levels from ``objective.preconditioning`` (the schedule
    is then only the grid the samplers walk)."""
    notes = []
    size = int(OmegaConf.select(cfg, "data.image_size", default=0) or 0)
    levels = len(OmegaConf.select(cfg, "model.channel_mults", default=[]) or [])
    if size >= 64 and 0 < levels < 4:  # the digits' nets on natural images
        notes.append(
            f"the net has {levels} resolution levels, made for 8-32 px; for {size} px images "
            "use experiment=images64|images128|images256 (or model=unet64|unet128|unet256)"
        )
    target = str(OmegaConf.select(cfg, "objective._target_", default=""))
    given = [o.lstrip("+~") for o in overrides if o.lstrip("+~").startswith("schedule")]
    if target.endswith("EDMLoss") and given:
        notes.append(
            f"{' '.join(given)} changes only the noise grid the samplers walk: the EDM "
            "objective draws its training noise levels from objective.preconditioning, so "
            "runs that differ only in the schedule train the same network"
        )
    return notes


def multirun() -> bool:
    """Whether this process runs a job of a Hydra ``-m`` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _multirun_group() -> str | None:
    """The sweep's folder name, which groups its jobs' W&B runs (None outside a sweep)."""
    return Path(HydraConfig.get().sweep.dir).name if multirun() else None


def hydra_overrides() -> tuple[list[str], set[str]]:
    """The task's command-line overrides and the names of the config groups."""
    if not HydraConfig.initialized():
        return [], set()
    hc = HydraConfig.get()
    return list(hc.overrides.task), set(hc.runtime.choices.keys())
