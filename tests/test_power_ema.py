"""ema=power through the real entry points: snapshots, exact resume with the default
callbacks, post-hoc EMA in sample.py (also as a -m sweep) and benchmarks/ema_sweep.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ddpm.runs.build import build_callbacks
from ddpm.runs.cli import train
from ddpm.runs.sampling import prepare_sample
from ddpm.training.posthoc_ema import list_snapshots, reconstruct, sigma_rel_to_gamma
from ddpm.training.power_ema import PowerEMA
from tests.conftest import TINY, call_entry, compose_train
from tests.test_resume import WITH_CALLBACKS, _load, _max_diff, _train, straight_and_split

POWER = ["callbacks.ema.snapshot_every=4"]  # ema=power is the default


@pytest.fixture(scope="module")
def power_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.py ema=power`` with the default callbacks (grids, FID), 6 steps, snapshots
    every 4 steps and every checkpoint kept (steps 3 and 6). Read-only."""
    work = tmp_path_factory.mktemp("power_run")
    result = call_entry(
        "train.py", *TINY, *POWER, "logger=none", "callbacks.checkpoint.save_top_k=-1",
        f"hydra.run.dir={work / 'run'}", cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ema=standard run, 6 steps, no logger or FID (in this process). Read-only."""
    run = tmp_path_factory.mktemp("standard_run") / "run"
    train(compose_train([*TINY, "ema=standard", "logger=none", "eval=null"], run))
    return run


def test_a_standard_ema_checkpoint_continues_with_every_power_ema_from_its_ema(
    standard_run, tmp_path
):
    """ckpt_path= of an ema=standard run into the default (ema=power): the tracked EMAs
    all start from that run's EMA (not from the initial weights) and the profile goes on
    from the checkpoint's step."""
    ckpt = _load(standard_run / "checkpoints" / "last.ckpt")
    run = tmp_path / "run"
    # another seed: other initial weights, so a start from those would show; a long
    # second EMA (0.3: beta = (7/8)^0.67 at step 8) still holds 82% of where it started
    _train(run, tmp_path, *TINY, "logger=none", "eval=null", "trainer.max_steps=8", "seed=7",
           "callbacks.ema.stds=[0.15,0.3]",
           f"ckpt_path={standard_run / 'checkpoints' / 'last.ckpt'}")  # fmt: skip
    after = _load(run / "checkpoints" / "last.ckpt")
    other = after["callbacks"]["PowerEMA"]["others"][0]
    moved = _max_diff(other, {k: ckpt["state_dict"][k] for k in other})
    assert 0 < moved < 0.05, moved
    assert [s for s, _, _ in list_snapshots(run / "ema_snapshots")] == [7, 7, 8, 8]
    assert after["global_step"] == 8


def test_snapshots_are_written_atomically_and_load_with_weights_only(power_run):
    snaps = list_snapshots(power_run / "ema_snapshots")
    assert [(step, std) for step, std, _ in snaps] == [(4, 0.05), (4, 0.15), (6, 0.05), (6, 0.15)]
    assert not list((power_run / "ema_snapshots").glob(".tmp-*"))
    record = torch.load(snaps[-1][2], weights_only=True)  # step 6, std 0.15
    assert set(record) == {"step", "std", "gamma", "state_dict"}
    assert record["gamma"] == pytest.approx(sigma_rel_to_gamma(0.15))
    ckpt = _load(power_run / "checkpoints" / "last.ckpt")
    # the first std is the run's EMA: the checkpoint's state_dict at the last step
    for name, value in record["state_dict"].items():
        assert value.dtype == torch.float32
        assert torch.equal(value, ckpt["state_dict"][name])
    # the other average is in the callback state, for an exact resume
    other = ckpt["callbacks"]["PowerEMA"]["others"][0]
    assert _max_diff(other, torch.load(snaps[-2][2], weights_only=True)["state_dict"]) == 0


def test_reconstructing_a_tracked_std_returns_that_average(power_run):
    ckpt = _load(power_run / "checkpoints" / "last.ckpt")
    for std, expect in ((0.15, ckpt["state_dict"]), (0.05, None)):
        state, step = reconstruct(power_run / "ema_snapshots", 6, std)
        if expect is None:
            expect = ckpt["callbacks"]["PowerEMA"]["others"][0]
        assert step == 6
        for name, value in state.items():
            scale = expect[name].abs().max().clamp_min(1e-3)
            assert (value - expect[name]).abs().max() / scale < 1e-3, name


def test_power_ema_resumes_exactly_with_the_default_callbacks(tmp_path):
    """8 steps straight == 4 steps, then 4 more through resume=RUN_DIR: both EMAs, the
    raw weights, and every snapshot (every 3 steps, at the end, and at the end of the
    first half, step 4); a validation (grids, FID) at step 6, after the resume."""
    common = [*WITH_CALLBACKS, "callbacks.ema.snapshot_every=3", "trainer.val_check_interval=6",
              "seed=7", "logger=csv"]  # fmt: skip
    a, b = straight_and_split(tmp_path, common, 8)
    straight, split = tmp_path / "straight", tmp_path / "split"
    for key in ("state_dict", "current_model_state", "optimizer_states"):
        assert _max_diff(a[key], b[key]) <= 1e-6, key
    assert _max_diff(a["callbacks"]["PowerEMA"], b["callbacks"]["PowerEMA"]) <= 1e-6
    assert _max_diff(a["state_dict"], a["current_model_state"]) > 1e-4  # EMA, raw apart
    assert len(list((split / "samples").glob("grid_*.png"))) == 1
    snaps_a = list_snapshots(straight / "ema_snapshots")
    snaps_b = {(s, d): p for s, d, p in list_snapshots(split / "ema_snapshots")}
    assert [s for s, _, _ in snaps_a] == [3, 3, 6, 6, 8, 8]
    assert sorted({s for s, _ in snaps_b}) == [3, 4, 6, 8]
    for step, std, path in snaps_a:
        theirs = torch.load(snaps_b[(step, std)], weights_only=True)["state_dict"]
        assert _max_diff(torch.load(path, weights_only=True)["state_dict"], theirs) <= 1e-6


def test_half_precision_snapshots_and_bad_settings(tmp_path):
    cfg = compose_train([*TINY, *POWER, "callbacks.ema.snapshot_dtype=bfloat16"], tmp_path)
    (callback,) = [c for c in build_callbacks(cfg) if isinstance(c, PowerEMA)]
    assert callback.snapshot_dtype == torch.bfloat16 and callback.stds == [0.15, 0.05]
    for kwargs, message in [
        ({"stds": [0.05, 0.4]}, r"callbacks.ema.stds=0.4 is not allowed: it must lie in"),
        ({"stds": []}, "must list at least one std"),
        ({"stds": [0.05, 0.0501]}, "repeats a std"),
        ({"snapshot_every": 0}, "snapshot_every must be an integer >= 1"),
        ({"snapshot_dtype": "int8"}, "snapshot_dtype='int8' is not one of float32"),
        ({"decay": 0.999}, "callbacks.ema.decay belongs to ema=standard"),
    ]:
        with pytest.raises(ValueError, match=message):
            PowerEMA(**kwargs)
    result = call_entry("train.py", *TINY, "+callbacks.ema.decay=0.99", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: callbacks.ema.decay belongs to ema=standard; ema=power takes "
        "callbacks.ema.stds (relative stds, e.g. [0.15,0.05]): give ema=standard, "
        "or drop the decay with ~callbacks.ema.decay"
    ]
    assert not (tmp_path / "logs").exists()


def test_sample_py_sweeps_posthoc_ema_lengths_with_m(power_run, tmp_path):
    """``sample.py -m ... ema_std=null,0.08``: one folder per job; null draws the
    checkpoint's own weights, 0.08 the EMA rebuilt at the checkpoint's step."""
    ckpt = power_run / "checkpoints" / "last.ckpt"
    result = call_entry("sample.py", "-m", f"ckpt_path={ckpt}", "num_samples=4", "device=cpu",
                       "ema_std=null,0.08", f"out_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    plain, rebuilt = (json.loads((tmp_path / j / "samples.json").read_text()) for j in "01")
    assert plain["posthoc_ema"] is None
    assert rebuilt["posthoc_ema"]["ema_std"] == 0.08 and rebuilt["posthoc_ema"]["step"] == 6
    assert rebuilt["posthoc_ema"]["snapshots"] == 4
    a, b = (np.load(tmp_path / j / "samples.npz")["images"] for j in "01")
    assert not np.array_equal(a, b)  # other weights, other images


def test_bad_ema_std_is_refused_in_one_line(power_run, standard_run, tmp_path):
    """Out of range (through sample.py: one stderr line, exit 2, nothing written), a run
    without snapshots, a checkpoint before the first snapshot."""
    last = power_run / "checkpoints" / "last.ckpt"
    result = call_entry("sample.py", f"ckpt_path={last}", "ema_std=0.5",
                       f"out_dir={tmp_path / 'out'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: ema_std=0.5 is not allowed: it must lie in (0, 0.3] (the EMA's std relative "
        "to the training length; EDM2 uses 0.01-0.2)"
    ]
    assert not (tmp_path / "out").exists()
    early = next((power_run / "checkpoints").glob("*step=0000003*"))
    for ckpt, message in [
        (standard_run / "checkpoints" / "last.ckpt", "no EMA snapshots in "),
        (early, "the checkpoint is at step 3, before the first EMA snapshot (step 4"),
    ]:
        cfg = OmegaConf.create({"ckpt_path": str(ckpt), "ema_std": 0.1, "num_samples": 1,
                                "seed": 0, "out_dir": str(tmp_path / "x")})  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            prepare_sample(cfg)
        assert "\n" not in str(info.value)


def test_ema_sweep_benchmark_writes_table_plot_and_best(power_run, tmp_path):
    script = "benchmarks/ema_sweep.py"
    args = [str(power_run), "--stds", "0.05,0.15,0.2", "--num-samples", "8", "--out",
            str(tmp_path), "--baseline", str(power_run / "checkpoints" / "last.ckpt")]  # fmt: skip
    result = call_entry(script, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [
        "checkpoint (ema_std 0.15)", "baseline 0 (ema_std 0.15)",
        "ema_std=0.05", "ema_std=0.15", "ema_std=0.2",
    ]  # fmt: skip
    assert rows[0]["fid"] == rows[1]["fid"]  # the same checkpoint, the same images
    assert rows[3]["fid"] == pytest.approx(rows[0]["fid"], rel=1e-2)  # 0.15 is the tracked
    assert "best: ema_std=" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "fid_vs_ema_std.png").stat().st_size > 1000
    bad = call_entry(script, str(power_run), "--stds", "0.5", cwd=tmp_path)
    assert bad.returncode != 0 and "--stds=0.5 is not allowed" in bad.stderr
