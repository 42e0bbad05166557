"""Shared fixtures: real Hydra composition of conf/, shrunk to seconds-long runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import ddpm.runs.cli  # noqa: F401 - registers the ${ddpm.*} resolvers the configs use

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Overrides that make a training run take seconds on a CPU.
TINY = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "data.batch_size=16",
    "data.val_fraction=0.02",
    "schedule.num_timesteps=20",
    "model.base_channels=8",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.trajectory_samples=2",
    "eval.num_samples=8",
    "eval.batch_size=8",
    "sampler.steps=3",  # the run's sampler (EDM Heun, 5 NFE): grids and val/fid
    "eval.kid_subsets=5",
]

# Feature nets and real-data statistics are cached here, never in the user's cache; the
# subprocesses of the end-to-end tests inherit it.
os.environ["DDPM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-cache-")


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def compose_train(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as Hydra would, with a concrete output dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides or [])
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def run_entry(
    script: str, *args: str, cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run train.py or sample.py as a user would, in ``cwd``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run through train.py (no logger, no FID): its run folder. Read-only."""
    work = tmp_path_factory.mktemp("tiny_run")
    result = run_entry(
        "train.py", *TINY, "logger=none", "eval=null", f"hydra.run.dir={work / 'run'}", cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"
