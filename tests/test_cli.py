"""The real entry points, run as a user runs them: train.py, sample.py, -m sweeps, errors."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm.data.datamodule import ImageDataModule
from ddpm.evaluation.features import extract_features, load_digits_feature_net
from ddpm.evaluation.stats_file import ReferenceStats
from ddpm.runs.errors import user_error
from ddpm.runs.prepare import prepare
from tests.conftest import ROOT, TINY, call_entry, compose_train, draw_from, run_entry, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run through train.py's main with the default (W&B, offline) logger."""
    work = tmp_path_factory.mktemp("train")
    run_dir = work / "run"
    result = call_entry("train.py", *TINY, f"hydra.run.dir={run_dir}", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_train_leaves_checkpoints_grids_config_and_logs(trained):
    run_dir, result = trained
    assert "Epoch 0" in result.stdout  # Lightning's progress bar
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("best-step=*-val_loss=*.ckpt"))) == 1
    assert len(list((run_dir / "samples").glob("grid_epoch=*_step=*.png"))) == 2
    assert "max_steps: 6" in (run_dir / "config.yaml").read_text()
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (run_dir / "train.log").is_file()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_sample_from_checkpoint_alone(trained, tmp_path):
    run_dir, _ = trained
    ckpt = tmp_path / "model.ckpt"  # away from its run dir: the checkpoint is enough
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", ckpt)
    out = tmp_path / "out"
    result = call_entry(
        "sample.py", f"ckpt_path={ckpt}", f"out_dir={out}", "num_samples=5", "seed=0", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampling" in result.stderr  # progress bar
    assert (out / "grid.png").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8

    again = tmp_path / "again"
    result = call_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        f"out_dir={again}",
        "num_samples=5",
        "seed=0",
        "batch_size=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(again / "samples.npz")["images"], images)


def test_wandb_offline_run_holds_the_pictures_and_val_fid(trained):
    run_dir, _ = trained
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    records = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
    keys = (b"val/fid", b"val/kid", b"val/loss", b"train/grad_norm", b"val_loss_by_sigma/sigma")
    for key in keys:  # the default objective (edm_digits) buckets the loss by sigma
        assert key in records, key
    images = [p.name for p in (run / "files" / "media" / "images").rglob("*.png")]
    for key in ("grid_ema", "ema_vs_raw", "trajectory", "loss_by_sigma"):
        assert any(name.startswith(key) for name in images), (key, images)


def test_sample_evaluate_writes_metrics_json(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "out"
    result = call_entry(
        "sample.py",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"out_dir={out}",
        "num_samples=20",
        "sampler=ddpm",
        "sampler.steps=10",
        "evaluate=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["kid_std"] >= 0 and "kid_mean" in metrics
    assert metrics["feature_extractor"] == "digits" and metrics["num_samples"] == 20
    assert metrics["sampler"]["name"] == "DDPMSampler" and metrics["sampler"]["steps"] == 10
    assert metrics["reference"]["split"] == "train" and metrics["reference"]["num_images"] > 1000
    assert "fid=" in result.stdout
    # beyond FID, at equal n (20 samples, 20 training images; the floor: 20 held-out ones)
    equal = metrics["equal_n"]
    assert equal["n"] == 20 and equal["reference_split"] == "train" and equal["k"] == 5
    for key in ("precision", "recall", "memorisation"):
        assert 0 <= metrics[key] <= 1 and metrics[key] == equal[key]
    assert equal["floor"]["images"] == "the val split" and equal["floor"]["memorisation"] == 0.05
    assert 0 <= equal["floor"]["precision"] <= 1 and equal["floor"]["fid"] > 0
    assert "at equal n=20 against the train split" in result.stdout


def test_sample_accepts_a_sampler_override(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "out"
    result = call_entry(
        "sample.py",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"out_dir={out}",
        "num_samples=2",
        "sampler=ddim",
        "sampler.steps=5",
        "sampler.eta=0.5",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "samples.json").read_text())["sampler"]
    assert info["name"] == "DDIMSampler" and info["steps"] == 5 and info["eta"] == 0.5


def test_multirun_of_ddp_jobs_gives_one_dir_and_one_logger_run_per_job(tmp_path):
    """A sweep whose jobs are 2-process DDP runs: one folder and one W&B run per job,
    none per rank."""
    result = run_entry(
        "train.py",
        "-m",
        "optimizer.lr=1e-3,2e-3",  # a sweep over something that changes training
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]"))
    runs = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        runs += list((job / "wandb").glob("offline-run-*"))
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)
        lr = ckpt["hyper_parameters"]["config"]["optimizer"]["lr"]
        assert lr == (1e-3 if job.name == "0" else 2e-3)
    assert len(runs) == 2 and runs[0].name != runs[1].name


def test_torchrun_processes_share_one_run_dir(tmp_path):
    """torchrun (the multi-node launcher) starts 2 processes with the same command: one
    run folder, one Hydra record, one checkpoint set."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "eval=null"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    run = subprocess.run(
        [
            *torchrun,
            str(ROOT / "train.py"),
            *args,
            "logger=csv",
            "seed=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in (tmp_path / "run" / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    assert len(list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))) == 2


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "train.py",
            ["model=huge"],
            "error: model=huge is not an option of the model group; choose one of base, "
            "ddpm_cifar10, dit_b, dit_l, dit_s, dit_xl, small, tiny, unet128, unet256, unet64 "
            "(conf/model/)",
        ),
        (
            "train.py",
            ["model.base_chanels=4"],
            "error: model.base_chanels is not a key of the config (did you mean "
            "model.base_channels?); a new key needs a +",
        ),
        ("sample.py", ["sampler=fast"], "error: sampler=fast is not an option of the sampler"),
        ("train.py", ["data.image_size=7"], "error: data.image_size=7 must be divisible by 2"),
        ("sample.py", ["ckpt_path=nowhere.ckpt"], "error: checkpoint not found: nowhere.ckpt"),
        (
            "sample.py",
            ["ckpt_path=garbage.ckpt"],
            "error: checkpoint garbage.ckpt is truncated or corrupt",
        ),
    ],
)
def test_bad_input_fails_fast_with_one_clear_line(script, args, expected, tmp_path):
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    result = (
        call_entry(script, *args, "logger=none", cwd=tmp_path)
        if script == "train.py"
        else call_entry(script, *args, f"out_dir={tmp_path / 'o'}", cwd=tmp_path)
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    # nothing was written: no run folder, no log, no .hydra record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.ckpt"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["schedule.num_timesteps=0"],
            "schedule.num_timesteps=0 is not allowed: it must be an integer >= 1",
        ),
        (
            ["objective=ddpm", "schedule.zero_terminal_snr=true"],
            "schedule.zero_terminal_snr=true needs objective.prediction_type=v_prediction",
        ),
        (["sampler=ddim", "sampler.eta=2"], "sampler.eta=2 must lie in [0, 1]"),
        (["objective=ddpm", "objective.weighting=snr"], "objective.weighting='snr' is unknown"),
        (
            ["objective=edm", "schedule=linear", "schedule.zero_terminal_snr=true"],
            "objective=edm samples on the schedule's sigma grid",
        ),
        (["sampler=edm", "sampler.sigma_min=90"], "sampler.sigma_min=90 and sampler.sigma_max"),
        (["augment=edm", "augment.p=2"], "augment.p=2 is not allowed: it must be a number in"),
        (
            ["trainer.max_steps=-1", "trainer.max_epochs=1"],
            "lr_scheduler=cosine decays to the last step, but trainer.max_steps=-1 sets none",
        ),
    ],
)
def test_bad_values_raised_while_building_give_the_line_train_py_prints(args, expected, tmp_path):
    """The same path as train.py (prepare, then the one-line message it prints), in-process:
    the subprocess cases above show that such a line is all the user sees."""
    with pytest.raises(Exception) as info:
        prepare(compose_train([*args, "logger=none"], tmp_path / "run"))
    message = user_error(info.value)
    assert message is not None and message.startswith(expected), message
    assert not (tmp_path / "run").exists()


def test_ddp_on_cpu_writes_one_run_dir(tmp_path):
    """Two gloo processes through the real entry point: one run dir, one checkpoint set,
    grids written once, identical initial weights, different data and timesteps per rank."""
    run_dir, probes = tmp_path / "run", tmp_path.parent / f"{tmp_path.name}-probes"
    # FID against a reference file in pytorch-fid's layout (mu and sigma only: no KID)
    reference = tmp_path.parent / f"{tmp_path.name}-reference.npz"
    real = ImageDataModule(name="digits").split_images("train")
    stats = ReferenceStats.from_features(extract_features(load_digits_feature_net(), real))
    np.savez(reference, mu=stats.mu, sigma=stats.sigma)
    result = run_entry(
        "train.py",
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "logger=csv",
        f"eval.fid_reference={reference}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.probe._target_=tests.faults.RankProbe",
        f"+callbacks.probe.out_dir={probes}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))[-1] == "last.ckpt"
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2  # last + best, once
    assert len(list((run_dir / "samples").glob("grid_*.png"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no second output dir per rank
    rank0, rank1 = (torch.load(probes / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["weights"], rank1["weights"])  # as built, before any broadcast
    assert not torch.equal(rank0["batch"], rank1["batch"])  # each rank its own shard
    assert not torch.equal(rank0["t"], rank1["t"])  # and its own timesteps (and noise)
    # Lightning's per-step SIGTERM broadcast (a host sync each step) is off: the guard
    # agrees on signals every log_every_n_steps instead
    assert "_broadcast_sigterm_tensor" not in rank0["broadcast_callers"]
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert sum(bool(r.get("val/loss")) for r in rows) == 2  # one synchronised value each
    assert sum(bool(r.get("val/fid")) for r in rows) == 2 and "val/kid" not in rows[0]


def test_console_scripts_find_their_configs(tmp_path):
    script = shutil.which("ddpm-sample")
    if script is None:
        pytest.skip("ddpm is not pip-installed")
    result = subprocess.run(
        [script, "ckpt_path=missing.ckpt", f"out_dir={tmp_path / 'o'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: checkpoint not found: missing.ckpt" in result.stderr


def test_quality_vs_steps_benchmark_runs_on_a_checkpoint(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "bench"
    script = "benchmarks/quality_vs_steps.py"
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    specs = ["ddim-3", "dpm_solver-3:solver=ode,spacing=logsnr", "edm-2:s_churn=5"]
    args = ["--ckpt", ckpt, "--num-samples", "8", "--batch-size", "4", "--out", str(out)]
    result = call_entry(script, *args, *specs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    # Heun: 2 steps - 1 evaluations
    assert [(r["spec"], r["nfe"]) for r in rows] == [(specs[0], 3), (specs[1], 3), (specs[2], 3)]
    assert all(np.isfinite(r["fid"]) and r["ms_per_image"] > 0 for r in rows)
    assert (out / "fid_vs_nfe.png").is_file()
    assert (out / "grid_dpm_solver-3_solver=ode_spacing=logsnr.png").is_file()  # portable name
    assert "| ddim-3 | 3 |" in (out / "table.md").read_text()
    bad = call_entry(script, "--ckpt", ckpt, "--out", str(out), "ddim", cwd=tmp_path)
    assert bad.returncode != 0 and "error: bad spec 'ddim'" in bad.stderr


def test_class_conditional_run_samples_requested_classes(trained, tmp_path):
    run_dir = tmp_path / "cond"
    ckpt, config = train_run(run_dir, "experiment=digits_cond", *TINY, "logger=none", cwd=tmp_path)
    assert config["model"]["num_classes"] == 10  # taken from the data, stored with the weights

    def draw(*args):
        return call_entry("sample.py", f"ckpt_path={ckpt}", "sampler.steps=3", *args, cwd=tmp_path)

    one = draw("sampler=ddim", f"out_dir={tmp_path / 'one'}", "num_samples=4", "class_label=3",
               "guidance_scale=2.0")  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert np.load(tmp_path / "one" / "samples.npz")["labels"].tolist() == [3, 3, 3, 3]
    every = draw("sampler=ddim", f"out_dir={tmp_path / 'all'}", "num_samples=12", "chunk_size=5")
    assert every.returncode == 0, every.stderr[-3000:]
    every_npz = np.load(tmp_path / "all" / "samples.npz")
    assert every_npz["labels"].tolist() == [*range(10), 0, 1]
    # the same draw from two gloo processes started by torchrun: images and labels, bit for bit
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "sample.py"), f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=3",
         f"out_dir={tmp_path / 'two'}", "num_samples=12", "chunk_size=5", "accelerator=cpu",
         "devices=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    two = np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(two["images"], every_npz["images"])
    assert np.array_equal(two["labels"], every_npz["labels"])
    bad = draw("sampler=ddim", f"out_dir={tmp_path / 'bad'}", "class_label=10")
    assert bad.returncode == 2 and "error: class_label=10 is out of range" in bad.stderr
    plain = call_entry(
        "sample.py", f"ckpt_path={trained[0] / 'checkpoints' / 'last.ckpt'}", "class_label=1",
        f"out_dir={tmp_path / 'plain'}", cwd=tmp_path,
    )  # fmt: skip
    assert plain.returncode == 2 and "this checkpoint is unconditional" in plain.stderr


def test_edm_preset_trains_with_the_default_callbacks_and_samples_from_the_checkpoint(tmp_path):
    """experiment=digits_edm through train.py (EMA, grids, FID, loss by sigma, checkpoints
    on), then sample.py with nothing but the checkpoint: its stored config rebuilds the
    preconditioning; DDIM and DPM-Solver++ sample the EDM-trained net too."""
    run_dir = tmp_path / "edm"
    tiny = [o for o in TINY if not o.startswith("sampler.")]
    ckpt, config = train_run(
        run_dir, "experiment=digits_edm", *tiny, "sampler.steps=3", "logger=csv", cwd=tmp_path
    )
    assert config["objective"]["_target_"] == "ddpm.diffusion.objectives.EDMLoss"
    assert config["objective"]["preconditioning"]["sigma_data"] > 0
    assert config["schedule"]["name"] == "edm" and config["sampler"]["steps"] >= 1
    assert config.get("augment") is None and "augment_dim" not in config["model"]  # measured off
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert any(r.get("val/fid") for r in rows)
    assert any(k.startswith("val_loss_by_sigma/sigma") and r[k] for r in rows for k in r)
    assert len(list((run_dir / "loss_by_sigma").glob("step=*.png"))) == 2
    assert len(list((run_dir / "samples").glob("grid_epoch=*_step=*.png"))) == 2
    for name, extra in (("edm", []), ("ddim", ["sampler=ddim", "sampler.steps=4"])):
        images, used = draw_from(ckpt, tmp_path / name, *extra, cwd=tmp_path)
        assert images.shape == (3, 8, 8, 1) and images.std() > 0
        assert used == ("EDMSampler" if name == "edm" else "DDIMSampler")
