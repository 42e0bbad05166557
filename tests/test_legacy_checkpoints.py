"""Checkpoints written before the layered layout still load, sample and resume.

``tests/data/pre_layout/`` holds a checkpoint written by the code of commit cc6f3cb (the
default config and callbacks, shrunk; see ``tests/data/README.md``) and what that code's
``sample.py`` drew from it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from hydra.utils import get_object

from ddpm.runs.build import load_module
from ddpm.runs.checkpoints import read_checkpoint
from ddpm.runs.cli import train
from ddpm.runs.legacy import MOVED_TARGETS, upgrade_targets
from tests.conftest import ROOT, TINY, call_entry, compose_train

FIXTURE = ROOT / "tests" / "data" / "pre_layout"
CKPT = FIXTURE / "last.ckpt"


def _targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _without_targets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_targets(v) for k, v in node.items() if k != "_target_"}
    if isinstance(node, list):
        return [_without_targets(v) for v in node]
    return node


def test_the_stored_config_is_pointed_at_the_new_modules_and_nothing_else_changes():
    stored = torch.load(CKPT, weights_only=True)["hyper_parameters"]["config"]
    old = set(_targets(stored))
    # the fixture really names the old paths (one per moved module)
    assert {
        "ddpm.schedules.NoiseSchedule.from_name",
        "ddpm.objectives.DiffusionLoss",
        "ddpm.samplers.DPMSolverSampler",
        "ddpm.data.ImageDataModule",
        "ddpm.callbacks.SampleGrid",
        "ddpm.callbacks.LossByTimestep",
        "ddpm.callbacks.SampleQuality",
        "ddpm.ema.EMA",
        "ddpm.progress.ProgressBar",
        "ddpm.guards.TrainerGuard",
    } <= old
    upgraded = read_checkpoint(CKPT)["hyper_parameters"]["config"]
    new = set(_targets(upgraded))
    assert not new & set(MOVED_TARGETS)
    for target in new:  # every object the config names exists under today's paths
        assert callable(get_object(target)), target
    assert _without_targets(upgraded) == _without_targets(stored)
    assert upgrade_targets(upgraded) == upgraded  # a current config is left as it is


def test_a_pre_layout_checkpoint_loads_and_samples_what_it_sampled_before(tmp_path):
    module = load_module(CKPT)
    stored = torch.load(CKPT, weights_only=True)["state_dict"]
    assert module.state_dict().keys() == stored.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in stored.items())

    out = tmp_path / "out"
    result = call_entry(
        "sample.py", f"ckpt_path={CKPT}", f"out_dir={out}", "num_samples=8", "seed=0", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    now = np.load(out / "samples.npz")["images"].astype(int)
    before = np.load(FIXTURE / "samples.npz")["images"].astype(int)
    assert now.shape == before.shape == (8, 8, 8, 1)
    # the same images (one grey level of slack for another CPU's float rounding)
    assert np.abs(now - before).max() <= 1
    assert (now == before).mean() > 0.99


def test_a_pre_layout_run_resumes_in_its_folder_and_continues_from_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(CKPT, run / "checkpoints" / "last.ckpt")
    before = read_checkpoint(CKPT)
    assert before["global_step"] == 4

    resumed = call_entry("train.py", f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 6
    raw = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not set(_targets(raw["hyper_parameters"]["config"])) & set(MOVED_TARGETS)
    assert raw["hyper_parameters"]["config"]["paths"]["output_dir"] == str(run)
    moved = [not torch.equal(raw["state_dict"][k], v) for k, v in before["state_dict"].items()]
    assert any(moved)  # it trained on

    new = tmp_path / "new"  # ckpt_path= continues it in a new folder (in-process: time)
    # its settings: the DDPM objective, the default when it was written
    overrides = [*TINY, "objective=ddpm", "model.base_channels=4", "logger=none"]
    cfg = compose_train([*overrides, f"ckpt_path={CKPT}"], new)
    train(cfg)
    assert read_checkpoint(new / "checkpoints" / "last.ckpt")["global_step"] == 6
