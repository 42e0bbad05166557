"""Never lose a run: exact resume, signals, and SIGKILL during a checkpoint write, with
real train.py processes and real signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.runs.checkpoints import CheckpointError
from ddpm.runs.cli import train
from ddpm.runs.errors import UsageError
from ddpm.runs.prepare import prepare
from ddpm.runs.resume import apply_resume
from tests.conftest import ROOT, TINY, call_entry, compose_train, run_entry

# Small, deterministic CPU runs: 1,761 training digits at batch 64 = 27 batches per epoch,
# so step 20 is mid-epoch and 40 lies in the second epoch.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=5",
    "data.batch_size=64",
    "data.val_fraction=0.02",
    "schedule.num_timesteps=20",
    "model.base_channels=8",
    "eval=null",
    "callbacks.sample_grid=null",
    "callbacks.loss_by_timestep=null",
    "+trainer.enable_progress_bar=false",
]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a, b) -> float:
    """Largest absolute difference between two nested structures of tensors."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, list | tuple):
        assert len(a) == len(b)
        return max([_max_diff(x, y) for x, y in zip(a, b, strict=True)] or [0.0])
    assert a == b, (a, b)
    return 0.0


# The default callbacks, all on (EMA, sample grids, FID/KID, loss by timestep), shrunk
# to a few images each so that a validation takes a fraction of a second.
DEFAULT_CALLBACKS = [
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.trajectory_samples=2",
    "eval.num_samples=8",
    "eval.batch_size=8",
    "sampler.steps=3",  # the run's sampler draws grids and val/fid
    "eval.kid_subsets=5",
]
WITH_CALLBACKS = [
    *(o for o in FAST if not o.startswith(("eval=", "callbacks."))),
    *DEFAULT_CALLBACKS,
]


def _train(run_dir: Path, cwd: Path, *args: str) -> None:
    result = call_entry("train.py", *args, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def straight_and_split(cwd: Path, common: list[str], steps: int) -> tuple[dict, dict]:
    """``steps`` optimizer steps straight (cwd/straight), and half of them then the rest
    through resume=RUN_DIR (cwd/split), with the same ``common`` overrides: the two final
    checkpoints."""
    straight, split = cwd / "straight", cwd / "split"
    _train(straight, cwd, *common, f"trainer.max_steps={steps}")
    _train(split, cwd, *common, f"trainer.max_steps={steps // 2}")
    _train(split, cwd, f"resume={split}", f"trainer.max_steps={steps}")
    return _load(straight / "checkpoints" / "last.ckpt"), _load(split / "checkpoints" / "last.ckpt")


def _same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        assert _max_diff(a[key], b[key]) <= 1e-6, key


def test_interrupted_and_resumed_run_equals_the_straight_run(tmp_path):
    """2N steps straight == N steps, then N more through resume=RUN_DIR, and through
    ckpt_path=CKPT into a new folder (to 1e-6): raw weights, EMA, optimizer, LR schedule,
    counters, batch order and noise; same W&B run. Default callbacks on; the split (step
    6) comes before the first validation (step 8), and the last step (12) has none, so
    both checkpoints are written at the end of training, where the EMA is copied into
    the module. (The processes given seed=7 also make the same first N steps.)"""
    common = [*WITH_CALLBACKS, "trainer.val_check_interval=8", "seed=7"]
    straight, split, moved = tmp_path / "straight", tmp_path / "split", tmp_path / "moved"
    _train(straight, tmp_path, *common, "trainer.max_steps=12")
    _train(split, tmp_path, *common, "trainer.max_steps=6")
    first = _load(split / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 6  # saved at the end, before any validation
    assert (
        _max_diff(first["state_dict"], first["current_model_state"]) > 1e-6
    )  # raw kept (power EMA 0.15 is near the raw weights at step 6)

    ckpt = f"ckpt_path={split}/checkpoints/last.ckpt"
    _train(moved, tmp_path, *common, ckpt, "trainer.max_steps=12", "logger=csv")
    _train(split, tmp_path, f"resume={split}", "trainer.max_steps=12")
    a = _load(straight / "checkpoints" / "last.ckpt")
    for other in (split, moved):
        b = _load(other / "checkpoints" / "last.ckpt")
        _same_state(a, b)
        assert b["optimizer_states"][0]["state"][0]["step"].item() == 12
    assert _max_diff(a["state_dict"], a["current_model_state"]) > 1e-6
    assert len(list((split / "samples").glob("grid_*.png"))) == 1  # the validation at 8

    # one W&B run, continued; the first invocation's record and config are kept
    runs = sorted(p.name for p in (split / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1]
    assert (
        _load(split / "checkpoints" / "last.ckpt")["logger_run_ids"]["wandb"]
        == (runs[0].rsplit("-", 1)[1])
    )
    assert (split / ".hydra" / "overrides.yaml").is_file()
    assert len(list((split / ".hydra").glob("resumed_*/overrides.yaml"))) == 1
    assert "max_steps: 6" in (split / "config.step=6.yaml").read_text()
    assert "max_steps: 12" in (split / "config.yaml").read_text()


def test_validation_does_not_change_training(tmp_path):
    """The raw weights and optimizer state after 6 steps are the same with no validation,
    and with validations (EMA swapped in, grids, FID, loss by timestep) at steps 3 and 6,
    the last on the final step; without EMA the raw weights are the same again, and so
    they are when last.ckpt is written at train end (no guard)."""
    states = {}
    variants = {
        "none": ["+trainer.limit_val_batches=0"],
        "two": ["trainer.val_check_interval=3"],
        "no_ema": ["+trainer.limit_val_batches=0", "callbacks.ema=null"],
        # without the guard, ModelCheckpoint writes last.ckpt at train end, after the EMA
        # callback has copied the average into the module
        "no_guard": ["+trainer.limit_val_batches=0", "trainer_guard=null"],
    }
    for name, extra in variants.items():
        run = tmp_path / name
        cfg = compose_train([*WITH_CALLBACKS, "trainer.max_steps=6", "logger=csv", *extra], run)
        train(cfg)
        states[name] = _load(run / "checkpoints" / "last.ckpt")
    none, two, no_ema = states["none"], states["two"], states["no_ema"]
    assert len(list((tmp_path / "two" / "samples").glob("grid_*.png"))) == 2
    assert not (tmp_path / "none" / "samples").exists()
    assert _max_diff(none["current_model_state"], two["current_model_state"]) <= 1e-6
    assert _max_diff(none["state_dict"], two["state_dict"]) <= 1e-6  # the EMA too
    assert _max_diff(none["optimizer_states"], two["optimizer_states"]) <= 1e-6
    assert _max_diff(none["current_model_state"], no_ema["state_dict"]) <= 1e-6
    no_guard = states["no_guard"]
    assert _max_diff(none["current_model_state"], no_guard["current_model_state"]) <= 1e-6
    assert _max_diff(none["state_dict"], no_guard["state_dict"]) <= 1e-6
    assert _max_diff(none["state_dict"], none["current_model_state"]) > 1e-6


def _resume_cfg(run: Path, *overrides: str):
    """The config train.py composes for ``python train.py resume=RUN ...``."""
    return compose_train([f"resume={run}", *overrides], output_dir=run)


def test_resume_refuses_what_it_cannot_continue(tiny_run, tmp_path):
    groups = {"model", "data", "schedule", "sampler", "trainer", "logger"}
    with pytest.raises(CheckpointError, match=r"model=small would change the run being resumed"):
        apply_resume(_resume_cfg(tiny_run, "model=small"), ["model=small"], groups)
    with pytest.raises(UsageError, match=r"is at step 6, and trainer\.max_steps=6: nothing to"):
        prepare(_resume_cfg(tiny_run), [], groups)
    with pytest.raises(CheckpointError, match="give resume=RUN_DIR or ckpt_path=CKPT"):
        apply_resume(_resume_cfg(tiny_run, "ckpt_path=x.ckpt"), [], groups)
    with pytest.raises(CheckpointError, match="continues the run in its own folder"):
        apply_resume(compose_train([f"resume={tiny_run}"], output_dir=tmp_path / "b"), [], groups)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint to continue from"):
        apply_resume(_resume_cfg(empty), [], groups)
    # the stored config, with plain values changed from the command line
    cfg = apply_resume(_resume_cfg(tiny_run), ["trainer.max_steps=9"], groups)
    assert cfg.trainer.max_steps == 9 and cfg.model.base_channels == 8
    assert cfg.ckpt_path == str(tiny_run / "checkpoints" / "last.ckpt")
    # another model from the same checkpoint: say what differs
    other = compose_train(
        ["model.base_channels=16", f"ckpt_path={tiny_run}/checkpoints/last.ckpt"], tmp_path / "o"
    )
    with pytest.raises(CheckpointError, match=r"model\.base_channels: checkpoint 8, this run 16"):
        prepare(other)


def test_a_run_folder_is_never_started_over(tiny_run, tmp_path):
    """train.py hydra.run.dir=DIR on a DIR that holds a run, without resume=: refused in
    one line naming resume=DIR and a fresh folder; the run's files stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = call_entry(
        "train.py", *TINY, "logger=none", "eval=null", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {run} holds a run already (checkpoints/last.ckpt): continue it with "
        f"resume={run}, or start a new run in a fresh folder (hydra.run.dir=NEW_DIR)"
    ]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_auto_starts_then_continues_a_run(tmp_path):
    """resume=auto with the same command twice (what a requeued job does): the first
    starts the run, the second continues it although the command repeats group choices."""
    auto = tmp_path / "auto"
    for steps in (2, 4):
        result = call_entry(
            "train.py",
            *WITH_CALLBACKS,
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=2",
            "logger=none",
            "resume=auto",
            f"hydra.run.dir={auto}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert _load(auto / "checkpoints" / "last.ckpt")["global_step"] == steps
    assert sorted(p.name for p in (auto / "checkpoints").iterdir())[-1] == "last.ckpt"
    # requeued after it finished: nothing to do, and no error
    result = call_entry(
        "train.py",
        *WITH_CALLBACKS,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "logger=none",
        "resume=auto",
        f"hydra.run.dir={auto}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is complete (step 4, trainer.max_steps=4): nothing to do" in result.stderr


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(
    predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def _interrupt(run: Path, signum: int, extra: list[str], cwd: Path) -> tuple[str, int]:
    """Start an endless run, send ``signum`` once it has a checkpoint; (stderr, step)."""
    proc = _start(
        [
            *WITH_CALLBACKS,
            *extra,
            "trainer.max_steps=100000",
            "trainer.val_check_interval=5",
            "logger=csv",
            f"hydra.run.dir={run}",
        ],
        cwd,
    )
    _wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    return stderr, _load(run / "checkpoints" / "last.ckpt")["global_step"]


def _resume_to(run: Path, steps: int, cwd: Path, entry=call_entry) -> None:
    """``train.py resume=RUN`` to ``steps``; ``entry=run_entry`` for DDP, whose ranks
    Lightning starts as processes of the command."""
    result = entry("train.py", f"resume={run}", f"trainer.max_steps={steps}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == steps


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_run_resumes(signum, tmp_path):
    """SIGTERM (schedulers, `kill`) and SIGINT (Ctrl-C): save, stop, resume."""
    run = tmp_path / "run"
    stderr, step = _interrupt(run, signum, [], tmp_path)
    assert f"stopped by {signal.Signals(signum).name} after step {step};" in stderr
    ckpt = _load(run / "checkpoints" / "last.ckpt")  # the raw weights, not the EMA twice
    assert _max_diff(ckpt["state_dict"], ckpt["current_model_state"]) > 1e-6
    epochs = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert epochs["started"] == epochs["completed"] + 1  # saved mid-epoch, not closed
    assert f"Continue with: python train.py resume={run}" in stderr and step >= 5
    if signum == signal.SIGTERM:  # resuming after SIGINT is the same
        _resume_to(run, step + 3, tmp_path)


def test_sigterm_stops_both_ddp_ranks_at_one_step_and_the_run_resumes(tmp_path):
    """2 gloo processes; SIGTERM to rank 0 only (e.g. `kill`): the ranks agree on the step,
    save one checkpoint, exit; the resumed run continues under DDP."""
    run = tmp_path / "run"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16"]
    stderr, step = _interrupt(run, signal.SIGTERM, ddp, tmp_path)
    assert stderr.count("stopped by SIGTERM after step") == 1  # said once, by rank 0
    assert step % 5 == 0  # the ranks stop at a step where they compare flags
    _resume_to(run, step + 2, tmp_path, entry=run_entry)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A wider net makes each checkpoint ~40 MB; the process is killed while a write's
    temporary file exists. last.ckpt must still load, and the run resumes from it."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    proc = _start(
        [
            *FAST,
            "model.base_channels=128",
            "trainer.max_steps=100000",
            "trainer.val_check_interval=1",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    try:
        _wait_for(lambda: (ckpts / "last.ckpt").is_file(), proc, timeout=240)
        _wait_for(lambda: any(ckpts.glob(".tmp-*.part")), proc, timeout=120, poll=0.001)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(ckpts.glob(".tmp-*.part"))  # killed inside a write
    step = _load(ckpts / "last.ckpt")["global_step"]  # ... and the last one is whole
    assert step >= 1
    _resume_to(run, step + 1, tmp_path)
    assert not any(ckpts.glob(".tmp-*.part"))  # the partial file was swept
