"""ddpm.training.lr_schedules: the warm-up + cosine schedule of lr_scheduler=cosine."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch

from ddpm.runs.build import build_module
from ddpm.training.lr_schedules import WarmupCosine
from tests.conftest import TINY, compose_train


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler: WarmupCosine, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine_to_final_factor():
    sched = WarmupCosine(_optimizer(), warmup_steps=10, total_steps=110, final_factor=0.1)
    lrs = _lrs(sched, 130)
    assert lrs[0] == pytest.approx(1e-5)  # start_factor 0.01
    assert lrs[5] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lrs[10] == pytest.approx(1e-3)  # the peak, at the end of the warm-up
    # halfway through the decay: final + (1 - final) / 2 (cos(pi / 2) = 0)
    assert lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lrs[35] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:111]))
    assert lrs[110:] == pytest.approx([1e-4] * 20)  # held at final_factor after total_steps


def test_a_run_shorter_than_its_warmup_stays_in_it():
    """trainer.max_steps=6 with the default 100 warm-up steps: the lr only rises."""
    lrs = _lrs(WarmupCosine(_optimizer(), warmup_steps=100, total_steps=6), 6)
    assert lrs == pytest.approx([1e-3 * (0.01 + 0.99 * s / 100) for s in range(6)])


def test_state_keeps_position_not_shape():
    """Resuming restores the step; a continued run with another total keeps its own."""
    sched = WarmupCosine(_optimizer(), warmup_steps=0, total_steps=100)
    _lrs(sched, 50)
    state = sched.state_dict()
    assert "total_steps" not in state and state["last_epoch"] == 50
    same = WarmupCosine(_optimizer(), warmup_steps=0, total_steps=100)
    same.load_state_dict(state)
    assert same.get_lr() == pytest.approx([1e-3 * 0.5])  # the cosine's midpoint
    longer = WarmupCosine(_optimizer(), warmup_steps=0, total_steps=200)
    longer.load_state_dict(state)
    assert longer.total_steps == 200
    assert longer.get_lr() == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi / 4))])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": 10, "total_steps": -1}, "set trainer.max_steps >= 1, or use"),
        ({"warmup_steps": -1, "total_steps": 10}, "warmup_steps=-1 must be >= 0"),
        ({"warmup_steps": 0, "total_steps": 10, "final_factor": 2.0}, "final_factor=2.0"),
        ({"warmup_steps": 0, "total_steps": 10, "start_factor": 0.0}, "start_factor=0.0"),
    ],
)
def test_bad_settings_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        WarmupCosine(_optimizer(), **kwargs)
    assert "\n" not in str(info.value)


def test_the_default_run_decays_over_its_trainers_max_steps(tmp_path):
    """lr_scheduler=cosine (the default) leaves total_steps null: the module reads the
    Trainer's max_steps when it builds the scheduler, so a resume with more steps (the
    stored config holds null, not the old count) decays over the new total."""
    cfg = compose_train(TINY, tmp_path)
    assert cfg.lr_scheduler.total_steps is None
    module = build_module(cfg)
    module.trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, WarmupCosine) and scheduler.total_steps == 7
