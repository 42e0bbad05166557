"""Sweeps: a grid with the basic launcher and an Optuna search, with failing jobs."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import TINY, call_entry


def test_grid_sweep_keeps_the_good_jobs_when_others_crash_or_are_invalid(tmp_path):
    """Four jobs: one diverges (non-finite loss), two have an invalid value, one is fine."""
    sweep = tmp_path / "sweep"
    result = call_entry(
        "train.py",
        "-m",
        *TINY,
        "logger=csv",
        "eval=null",
        "+callbacks.poison._target_=tests.faults.PoisonBatches",
        "+callbacks.poison.steps=[2],[100]",
        "optimizer.lr=1e-3,-1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 1  # the sweep reports that jobs failed ...
    assert "error: optimizer.lr=-1 is not allowed" in result.stdout + result.stderr
    jobs = {p.name for p in sweep.iterdir() if p.is_dir()}
    # ... the invalid jobs left no folder, the diverged one its log, the good one everything
    assert jobs == {"0", "2"}
    assert "non-finite loss (nan) at step 2" in (sweep / "0" / "train.log").read_text()
    assert not (sweep / "0" / "checkpoints" / "last.ckpt").exists()
    assert (sweep / "2" / "checkpoints" / "last.ckpt").is_file()
    assert (sweep / "2" / "csv" / "metrics.csv").is_file()


def test_optuna_search_finishes_two_trials_with_their_results(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    result = call_entry(
        "train.py",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *TINY,
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the YAML search space (model.base_channels is fixed by TINY here)
    assert set(best["best_params"]) == {"optimizer.lr", "callbacks.ema.decay"}
    assert isinstance(best["best_value"], float)  # val/fid, returned by train()
    for trial in ("0", "1"):
        assert (sweep / trial / "checkpoints" / "last.ckpt").is_file()
