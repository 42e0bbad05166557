"""Continuing runs: ``resume=RUN_DIR`` (or ``resume=auto``) and ``ckpt_path=CKPT``.

``resume=RUN_DIR`` trains on in the run's own folder (Hydra's run dir is set to it by the
``ddpm.run_dir`` resolver), from its newest checkpoint, with the config stored in that
checkpoint: command-line values such as ``trainer.max_steps=3000`` are applied on top,
group choices (``model=small``) are refused, since they would change the run.
``resume=auto`` does the same with the run folder ``hydra.run.dir`` names when it holds a
checkpoint, and starts a new run there when it does not (preemptible jobs, SLURM).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ddpm.runs.checkpoints import (
    CheckpointError,
    config_differences,
    newest_checkpoint,
    read_checkpoint,
)

# Overrides that choose how to continue rather than what the run is.
_CONTROL_KEYS = ("resume", "ckpt_path")


def run_dir(resume: str | None, default: str) -> str:
    """``hydra.run.dir``: the folder being resumed, else ``default`` (a new timestamped one)."""
    return str(resume) if resume not in (None, "", "auto") else default


def hydra_subdir(directory: str) -> str | None:
    """``hydra.output_subdir``: ``.hydra``, or a fresh ``.hydra/resumed_<time>`` when the
    folder already holds a run, so a resume never overwrites the original record. None
    (no record) in the processes of rank > 0 that torchrun or srun start with the same
    command: rank 0 records the invocation once."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    if rank not in (None, "", "0"):
        return None
    if (Path(directory) / ".hydra").is_dir():
        return f".hydra/resumed_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    return ".hydra"


OmegaConf.register_new_resolver("ddpm.run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("ddpm.hydra_subdir", hydra_subdir, replace=True)


def _replace_prefix(node: Any, old: str, new: str) -> Any:
    """Point every path under the old run folder at the new one (a moved run resumes)."""
    if isinstance(node, dict):
        return {k: _replace_prefix(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_prefix(v, old, new) for v in node]
    if isinstance(node, str) and old and (node == old or node.startswith(old + "/")):
        return new + node[len(old) :]
    return node


def apply_resume(cfg: DictConfig, overrides: list[str], groups: set[str]) -> DictConfig:
    """The config to continue with: ``cfg`` itself for a new run, else the stored config
    of the newest checkpoint of the run folder with the plain overrides applied."""
    resume = cfg.get("resume")
    if resume is None:
        return cfg
    if cfg.get("ckpt_path") is not None:
        raise CheckpointError(
            "give resume=RUN_DIR or ckpt_path=CKPT, not both: resume continues a run folder "
            "from its newest checkpoint, ckpt_path starts a new folder from one checkpoint"
        )
    folder = Path(cfg.paths.output_dir)
    if resume != "auto" and not Path(resume).is_dir():
        raise CheckpointError(f"resume={resume}: no such run folder (pass a folder train.py wrote)")
    if resume != "auto" and Path(resume).resolve() != folder.resolve():
        raise CheckpointError(
            f"resume={resume} continues the run in its own folder, but the run folder is "
            f"{folder}: drop hydra.run.dir, or start a new folder from a checkpoint with "
            f"ckpt_path={resume}/checkpoints/last.ckpt"
        )
    try:
        ckpt = newest_checkpoint(folder)
    except CheckpointError:
        if resume == "auto":
            return cfg  # nothing to continue yet: a new run in this folder
        raise
    stored = read_checkpoint(ckpt)["hyper_parameters"]["config"]
    stored = _replace_prefix(
        stored, str(stored.get("paths", {}).get("output_dir", "")), str(folder)
    )
    merged = OmegaConf.create(stored)
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in _CONTROL_KEYS or key.startswith("hydra.") or override.is_sweep_override():
            continue
        if override.is_delete():
            raise CheckpointError(
                f"{override.input_line}: resume continues the stored config of {ckpt}; a "
                "deletion would change the run (start a new run, or use ckpt_path=)"
            )
        if key in groups:
            choices.append(override.input_line)
            continue
        OmegaConf.update(merged, key, override.value(), merge=True, force_add=override.is_add())
    if choices:  # allowed when they compose what the run already is (a repeated command)
        _check_same_run(ckpt, choices, OmegaConf.to_container(merged), cfg)
    with_open = OmegaConf.to_container(merged)
    with_open["resume"] = str(resume)
    with_open["ckpt_path"] = str(ckpt)
    return OmegaConf.create(with_open)


# Filled in at run time, so a fresh composition cannot match them.
_RUNTIME_KEYS = (
    "seed",
    "data.shuffle_seed",
    "model.num_classes",
    "model.augment_dim",
    "resume",
    "ckpt_path",
)


def _check_same_run(
    ckpt: Path, choices: list[str], stored: dict[str, Any], cfg: DictConfig
) -> None:
    """Group choices on a resume are fine when the config they compose equals the stored
    one (e.g. a requeued job repeating its command); otherwise say what they change."""
    current = OmegaConf.to_container(cfg, resolve=True)
    keys = tuple(k for k in {*stored, *current} if k not in ("paths", "hydra"))
    diffs = [
        d
        for d in config_differences(stored, current, keys)
        if not d.split(":")[0].startswith(_RUNTIME_KEYS)
    ]
    chosen = tuple(line.split("=")[0].lstrip("+") for line in choices)
    diffs.sort(key=lambda d: not d.startswith(chosen))  # what the choices change, first
    if diffs:
        raise CheckpointError(
            f"{' '.join(choices)} would change the run being resumed ({'; '.join(diffs[:3])}); "
            f"resume continues the stored config of {ckpt}: drop the group choice, start a new "
            "run, or use ckpt_path= to start one from this checkpoint"
        )
