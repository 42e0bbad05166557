"""Gradient accumulation as a plain trainer option: k micro-batches of b give the update
of one batch of k x b, with the default callbacks on, and every step count counts
optimizer steps."""

from __future__ import annotations

from ddpm.runs.cli import train
from ddpm.training.posthoc_ema import list_snapshots
from tests.conftest import TINY, compose_train
from tests.test_resume import _load, _max_diff

SGD = ["optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.weight_decay"]


def _pair(tmp_path, *extra: str) -> tuple[dict, dict, dict]:
    """6 optimizer steps of 16 digits, and of 4 micro-batches of 4: (checkpoints, run
    folders). Default callbacks on (EMA, grids, FID, loss by sigma), validations at 3, 6;
    the net without dropout (its masks are drawn per micro-batch)."""
    common = [*TINY, "logger=csv", "trainer.max_steps=6", "trainer.val_check_interval=3",
              "callbacks.ema.snapshot_every=2", "model.dropout=0.0", "seed=11", *extra]  # fmt: skip
    sizes = {"whole": ["data.batch_size=16"],
             "micro": ["data.batch_size=4", "trainer.accumulate_grad_batches=4"]}  # fmt: skip
    runs = {name: tmp_path / name for name in sizes}
    for name, size in sizes.items():
        train(compose_train([*common, *size], runs[name]))
    a, b = (_load(runs[n] / "checkpoints" / "last.ckpt") for n in sizes)
    return a, b, runs


def test_k_micro_batches_of_b_update_as_one_batch_of_k_times_b(tmp_path):
    """With plain SGD, whose update is linear in the gradient, the raw weights, both power
    EMAs and the lr schedule agree to float rounding after 6 steps."""
    a, b, _ = _pair(tmp_path, *SGD)
    assert a["global_step"] == b["global_step"] == 6
    for key in ("state_dict", "current_model_state", "lr_schedulers"):
        assert _max_diff(a[key], b[key]) <= 1e-7, key
    assert _max_diff(a["callbacks"]["PowerEMA"], b["callbacks"]["PowerEMA"]) <= 1e-7


def test_every_step_count_counts_optimizer_steps(tmp_path):
    """The default AdamW: validations (grids), EMA snapshots, the lr schedule and the EMA
    updates fall on the same optimizer steps; the weights agree to Adam's amplification of
    float rounding (its update divides by the root of tiny second moments)."""
    a, b, runs = _pair(tmp_path)
    for name in runs:
        grids = sorted(p.name for p in (runs[name] / "samples").glob("grid_*.png"))
        assert [int(g.split("step=")[1][:-4]) for g in grids] == [3, 6], (name, grids)
        snaps = [s for s, _, _ in list_snapshots(runs[name] / "ema_snapshots")]
        assert snaps == [2, 2, 4, 4, 6, 6], (name, snaps)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert (
        a["optimizer_states"][0]["state"][0]["step"]
        == b["optimizer_states"][0]["state"][0]["step"]
        == 6
    )
    for key in ("state_dict", "current_model_state"):
        assert _max_diff(a[key], b[key]) <= 2e-4, key
