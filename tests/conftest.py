"""Shared fixtures: real Hydra composition of conf/, shrunk to seconds-long runs."""

from __future__ import annotations

import io
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
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


def call_entry(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` in this process, as ``run_entry`` runs it in another:
    SCRIPT is a path under the repository (train.py, sample.py, benchmarks/x.py) or, for
    ``python -m``, a module name. The same Hydra main (composition, PrepareFirst, the run
    folder and its log), the exit status from ``SystemExit``, the console output; without
    the ~7 s interpreter start and imports. For tests where the process boundary is not
    what is tested: a -m sweep runs its jobs here too (the basic launcher), DDP ranks
    still start processes. What a run changes in this process (argv, sys.path, cwd,
    environment, signal and logging handlers, deterministic algorithms, Hydra's
    singletons) is put back afterwards."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    saved_env = dict(os.environ)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    deterministic = torch.are_deterministic_algorithms_enabled()
    path = ROOT / script
    sys.argv = [str(path) if script.endswith(".py") else script, *args]
    if script.endswith(".py"):
        sys.path.insert(0, str(path.parent))  # as python puts the script's folder first
    os.chdir(cwd)
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                if script.endswith(".py"):
                    runpy.run_path(str(path), run_name="__main__")
                else:  # imported already here, unlike in a fresh interpreter: no warning
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", ".*found in sys.modules", RuntimeWarning)
                        runpy.run_module(script, run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                if isinstance(exit_.code, str):  # raise SystemExit("error: ..."): exit 1
                    print(exit_.code, file=sys.stderr)
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        torch.use_deterministic_algorithms(deterministic)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def train_run(run_dir: Path, *args: str, cwd: Path) -> tuple[Path, dict[str, Any]]:
    """``python train.py ARGS hydra.run.dir=RUN_DIR`` as a user runs it (it must succeed):
    its last checkpoint and the resolved config stored in it."""
    result = call_entry("train.py", *args, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return ckpt, torch.load(ckpt, weights_only=True)["hyper_parameters"]["config"]


def draw_from(ckpt: Path, out: Path, *extra: str, cwd: Path) -> tuple[np.ndarray, str]:
    """``python sample.py ckpt_path=CKPT out_dir=OUT num_samples=3 EXTRA`` as a user runs it:
    the images it wrote (samples.npz, [N, H, W, C] uint8) and the sampler samples.json names."""
    drawn = call_entry(
        "sample.py", f"ckpt_path={ckpt}", f"out_dir={out}", "num_samples=3", *extra, cwd=cwd
    )
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    images = np.load(out / "samples.npz")["images"]
    return images, json.loads((out / "samples.json").read_text())["sampler"]["name"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run through train.py's main (no logger, no FID): its run folder. Read-only."""
    work = tmp_path_factory.mktemp("tiny_run")
    result = call_entry(
        "train.py", *TINY, "logger=none", "eval=null", f"hydra.run.dir={work / 'run'}", cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"
