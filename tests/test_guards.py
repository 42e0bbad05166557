"""Non-finite losses in real runs (NaN batches injected by tests.faults.PoisonBatches)."""

from __future__ import annotations

import csv

import pytest
import torch

from ddpm.runs.validation import ConfigError, validate_config
from ddpm.training.guards import TrainerGuard
from tests.conftest import call_entry, compose_train
from tests.test_resume import FAST


def _poison(*steps: int) -> list[str]:
    return [
        "+callbacks.poison._target_=tests.faults.PoisonBatches",
        f"+callbacks.poison.steps=[{','.join(map(str, steps))}]",
    ]


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = call_entry(
        "train.py",
        *FAST,
        *_poison(5),
        "trainer.max_steps=20",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=4",
        "logger=none",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    last = run / "checkpoints" / "last.ckpt"
    assert (
        f"error: non-finite loss (nan) at step 5: training stopped and nothing after it was "
        f"saved; the last good checkpoint is {last} (step 3)"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3  # the NaN weights of steps 5..8 were never written
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values())
    raw, ema = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the raw weights, not the EMA


def test_skip_policy_skips_the_update_and_counts_it(tmp_path):
    run = tmp_path / "run"
    result = call_entry(
        "train.py",
        *FAST,
        *_poison(2, 5),
        "trainer_guard.nonfinite=skip",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values())
    raw, ema = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the raw weights, not the EMA
    adam_steps = {s["step"].item() for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6.0}  # two of the eight updates were skipped on the device
    with open(run / "csv" / "metrics.csv") as f:
        skipped = [
            float(r["train/skipped_steps"])
            for r in csv.DictReader(f)
            if r.get("train/skipped_steps")
        ]
    assert skipped[-1] == 2 and skipped[0] == 0


def test_skip_needs_a_fused_optimizer(tmp_path):
    cfg = compose_train(["trainer_guard.nonfinite=skip", "optimizer.fused=false"], tmp_path)
    with pytest.raises(ConfigError, match=r"trainer_guard\.nonfinite=skip needs a fused optimizer"):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"nonfinite": "ignore"}, "trainer_guard.nonfinite='ignore' is unknown"),
        ({"check_every_n_steps": 0}, "trainer_guard.check_every_n_steps=0 must be >= 1"),
    ],
)
def test_guard_refuses_bad_settings(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        TrainerGuard(**kwargs)


@pytest.mark.parametrize(("kind", "where"), [("gpu", "GPU"), ("host", "host")])
def test_out_of_memory_is_one_line_naming_the_levers(kind, where, tmp_path):
    result = call_entry(
        "train.py", *FAST, "trainer.max_steps=4", "logger=none",
        "+callbacks.oom._target_=tests.faults.RunOutOfMemory", "+callbacks.oom.step=2",
        f"+callbacks.oom.kind={kind}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: out of {where} memory at data.batch_size=64: recompute activations with "
        "model.checkpointing=true, use a smaller data.batch_size with "
        "trainer.accumulate_grad_batches=K for the same global batch, or precision=bf16-mixed"
    )
    assert "Traceback" not in result.stderr
