"""Every user-facing value is checked at startup, and nothing is written before that."""

from __future__ import annotations

import pytest

from ddpm.runs.errors import UsageError
from ddpm.runs.prepare import prepare
from ddpm.runs.validation import ConfigError, validate_config
from tests.conftest import TINY, call_entry, compose_train


def test_every_shipped_config_passes():
    for overrides in (
        [],
        ["experiment=digits_long"],
        ["experiment=digits_cond"],
        ["experiment=mnist"],
        ["experiment=cifar10_ddpm", "trainer.accelerator=cpu", "precision=32-true"],
        ["trainer=ddp", "trainer.accelerator=cpu"],
        ["precision=bf16-mixed"],
    ):
        validate_config(compose_train(overrides, output_dir="/tmp/x"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=abc", "data.batch_size='abc' is not allowed: it must be an integer >= 1"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed"),
        ("optimizer.lr=-1", "optimizer.lr=-1 is not allowed: it must be a number > 0"),
        ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] is not allowed: it must be two numbers"),
        ("trainer.max_steps=0", "trainer.max_steps=0 is not allowed"),
        ("trainer.max_steps=1.5", "trainer.max_steps=1.5 is not allowed"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is not allowed"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is not allowed"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is not"),
        (
            "ema=standard callbacks.ema.decay=1.5",
            "callbacks.ema.decay=1.5 is not allowed: it must be a number in [0, 1)",
        ),
        (
            "callbacks.ema.snapshot_every=0",
            "callbacks.ema.snapshot_every=0 is not allowed: it must be an integer >= 1",
        ),
        (
            "callbacks.checkpoint.monitor=val/acc",
            "callbacks.checkpoint.monitor='val/acc' is not allowed",
        ),
        (
            "trainer_guard.nonfinite=maybe",
            "trainer_guard.nonfinite='maybe' is not allowed: it must be stop or skip",
        ),
        ("seed=-3", "seed=-3 is not allowed: it must be an integer >= 0, or null"),
        ("model.channel_mults=[1,0]", "model.channel_mults=[1, 0] is not allowed"),
        ("model.dropout=1", "model.dropout=1 is not allowed"),
        # the time embedding's frequencies are spaced by 1 / (base_channels / 2 - 1)
        ("model.base_channels=2", "model.base_channels=2 is not allowed: it must be an even"),
        ("model.init=xavier", "model.init='xavier' is not allowed: it must be one of ho, torch"),
        ("data.val_fraction=1", "data.val_fraction=1 is not allowed: it must be a number in"),
        ("data.val_size=0", "data.val_size=0 is not allowed: it must be an integer >= 1"),
        ("eval.num_samples=1", "eval.num_samples=1 is not allowed"),
        ("trainer.precision=8-mixed", "trainer.precision='8-mixed' is not allowed"),
        ("trainer.accelerator=tpu2", "trainer.accelerator='tpu2' is not allowed"),
        ("optimized_metric=loss", "optimized_metric='loss' is not allowed"),
        ("compile=yes", "compile='yes' is not allowed: it must be true or false"),
        ("compile_backend=fast", "compile_backend='fast' is not allowed: it must be a torch"),
        ("channels_last=1", "channels_last=1 is not allowed: it must be true or false"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(compose_train(override.split(" "), output_dir="/tmp/x"))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.accelerator=cpu", "precision=16-mixed"], "precision=16-mixed needs a CUDA GPU"),
        (["eval=null", "callbacks.checkpoint.monitor=val/fid"], "needs FID during training"),
        (["eval=null", "optimized_metric=val/fid"], "optimized_metric=val/fid needs FID"),
        (["trainer.accelerator=gpu"], "trainer.accelerator=gpu but no CUDA GPU is visible"),
    ],
)
def test_incompatible_combinations_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_config(compose_train(overrides, output_dir="/tmp/x"))


def test_seed_null_is_refused_when_torchrun_or_srun_started_the_processes(tmp_path, monkeypatch):
    """Each of those processes would draw its own seed: other weights, overlapping shards."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets (srun: SLURM_NTASKS)
    monkeypatch.delenv("DDPM_RUN_SEED", raising=False)
    cfg = compose_train([*TINY, "seed=null"], tmp_path / "run")
    with pytest.raises(UsageError, match="seed=null draws a seed in each process, and the 2"):
        prepare(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optimizer.lr=-1"], "error: optimizer.lr=-1 is not allowed: it must be a number > 0"),
        (["hydra.run.dir=afile/run"], "error: cannot write the run folder"),
    ],
)
def test_train_py_stops_before_writing_anything(args, expected, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    result = call_entry("train.py", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no logs/, no run dir


def test_a_schedule_under_the_edm_objective_is_said_to_set_only_the_sampling_grid(tmp_path, caplog):
    """The default objective (EDM) draws its training sigmas from its preconditioning: a
    schedule= choice then changes only the grid the samplers walk, and a line says so
    (two runs that differ only there train the same net); under objective=ddpm it is
    the training schedule, and nothing is said."""
    for extra, said in (
        (["schedule=linear"], True),
        (["objective=ddpm", "schedule=linear"], False),
    ):
        caplog.clear()
        cfg = compose_train(
            [*TINY, *extra, "schedule.num_timesteps=50", "logger=none", "eval=null"],
            tmp_path / "run",
        )
        with caplog.at_level("WARNING"):
            prepare(cfg, extra, set())
        note = "note: schedule=linear changes only the noise grid the samplers walk"
        assert (note in caplog.text) is said, caplog.text


def test_the_digits_net_on_64_px_images_gets_a_note_naming_the_presets():
    from ddpm.runs.prepare import no_effect_notes

    notes = no_effect_notes(compose_train(["data=folder", "data.root=x"]), [])
    assert notes == [
        "the net has 2 resolution levels, made for 8-32 px; for 64 px images use "
        "experiment=images64|images128|images256 (or model=unet64|unet128|unet256)"
    ]
    assert no_effect_notes(compose_train(["experiment=images64", "data.root=x"]), []) == []
    assert no_effect_notes(compose_train([]), []) == []
