"""Every option of every config group composes and instantiates."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from ddpm.runs.build import build_callbacks, build_module
from ddpm.runs.loggers import build_loggers
from ddpm.training.module import DiffusionModule
from ddpm.training.sample_grid import SampleGrid
from tests.conftest import CONF, TINY, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_have_the_documented_options():
    assert options("model") == [
        "base",
        "ddpm_cifar10",
        "dit_b",
        "dit_l",
        "dit_s",
        "dit_xl",
        "small",
        "tiny",
        "unet128",
        "unet256",
        "unet64",
    ]
    assert options("schedule") == ["cosine", "edm", "linear", "scaled_linear", "sigmoid"]
    assert options("precision") == ["16-mixed", "32-true", "auto", "bf16-mixed"]
    assert options("trainer") == ["cpu", "ddp", "default", "gpu"]
    assert options("logger") == ["csv", "none", "tensorboard", "wandb"]
    assert options("sampler") == ["ddim", "ddpm", "dpm_solver", "edm", "flow_euler", "flow_heun"]
    assert options("objective") == [
        "ddpm",
        "edm",
        "edm_digits",
        "edm_iddpm",
        "edm_ve",
        "edm_vp",
        "flow",
    ]
    assert options("lr_scheduler") == ["constant", "cosine"]
    assert options("augment") == ["edm"]
    assert options("data") == [
        "cifar10",
        "digits",
        "fashion_mnist",
        "folder",
        "mnist",
        "mnist5k",
        "shards",
    ]


def fit_one_step(cfg, tmp_path, callbacks=()) -> DiffusionModule:
    """One real Trainer step (and one validation batch) of the composed config."""
    module = build_module(cfg)
    trainer = L.Trainer(
        callbacks=list(callbacks),
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return module


@pytest.mark.parametrize("option", options("schedule"))
def test_every_schedule_trains_and_samples(option, tmp_path):
    assert instantiate(compose_train([f"schedule={option}"]).schedule).num_timesteps == 1000
    cfg = compose_train([*TINY, f"schedule={option}", "schedule.num_timesteps=50"], tmp_path)
    module = fit_one_step(cfg, tmp_path)
    images = module.sample(2, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("option", options("sampler"))
def test_every_sampler_trains_and_samples(option, tmp_path):
    flow = ["objective=flow"] if option.startswith("flow") else []  # they need its velocity
    cfg = compose_train([*TINY, *flow, f"sampler={option}", "sampler.steps=4"], tmp_path)
    # the training-time grid and trajectory drawn with this sampler (sampler: null)
    grid = SampleGrid(num_samples=2, sampler=None, trajectory_samples=1)
    module = fit_one_step(cfg, tmp_path, [grid])
    assert grid.last_path is not None and grid.last_path.is_file()
    assert list((tmp_path / "samples").glob("trajectory_step=*.png"))
    assert type(module.sampler).__name__.lower().startswith(option.replace("_", "")[:4])
    images = module.sample(2, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("option", options("objective"))
def test_every_objective_trains_and_samples(option, tmp_path):
    """Each objective with non-leaky augmentation on: the net gets the augmentation labels
    (model.augment_dim recorded in the config), the samplers its sampling model."""
    cfg = compose_train([*TINY, f"objective={option}", "augment=edm", "sampler.steps=3"], tmp_path)
    module = fit_one_step(cfg, tmp_path)
    assert cfg.model.augment_dim == 7 and module.net.augment_dim == 7
    assert module.hparams.config["model"]["augment_dim"] == 7
    expected = {"ddpm": "DiffusionLoss", "flow": "FlowLoss"}.get(option, "EDMLoss")
    assert type(module.objective).__name__ == expected
    if option != "ddpm":  # EDM's framework and flow bring EDM's grid and their sampler
        sampler = "FlowSampler" if option == "flow" else "EDMSampler"
        assert cfg.schedule.name == "edm" and type(module.sampler).__name__ == sampler
    images = module.sample(2, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_zero_terminal_snr_trains_with_v_prediction(tmp_path):
    cfg = compose_train(
        [
            *TINY,
            "objective=ddpm",
            "schedule.zero_terminal_snr=true",
            "objective.prediction_type=v_prediction",
            "sampler=dpm_solver",
            "sampler.steps=4",
        ],
        tmp_path,
    )
    module = fit_one_step(cfg, tmp_path)
    assert module.schedule.zero_terminal_snr
    assert torch.isfinite(module.sample(2, seed=0)).all()


def test_zero_terminal_snr_with_epsilon_is_refused_before_training(tmp_path):
    cfg = compose_train(["objective=ddpm", "schedule.zero_terminal_snr=true"], tmp_path)
    with pytest.raises(ValueError, match=r"needs objective\.prediction_type=v_prediction"):
        build_module(cfg)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_min_snr_with_zero_terminal_snr_is_refused_before_training(prediction_type, tmp_path):
    """min(SNR, gamma) / (SNR + 1) (v) and min(SNR, gamma) (x_0) are 0 at SNR = 0: the
    loss would never train the t = T-1 prediction every chain starts from."""
    overrides = [
        "objective=ddpm",
        "schedule.zero_terminal_snr=true",
        f"objective.prediction_type={prediction_type}",
        "objective.weighting=min_snr",
    ]
    with pytest.raises(ValueError, match=r"weighting=min_snr gives t = T-1 zero weight"):
        build_module(compose_train(overrides, tmp_path))
    build_module(compose_train([*overrides[:3], "objective.weighting=uniform"], tmp_path))


@pytest.mark.parametrize("option", options("data"))
def test_data_instantiates(option, tmp_path):
    dm = instantiate(compose_train([f"data={option}", f"data.root={tmp_path}"]).data)
    assert isinstance(dm, L.LightningDataModule)


@pytest.mark.parametrize("option", options("model"))
def test_module_builds_for_every_model(option, tmp_path):
    size, channels = (8, 1) if option == "tiny" else (32, 3)
    overrides = [f"model={option}", f"data.image_size={size}", f"data.channels={channels}"]
    if option in ("dit_l", "dit_xl"):  # 458M and 675M parameters: two of their blocks
        overrides.append("model.depth=2")
    module = build_module(compose_train(overrides, tmp_path))
    assert module.image_shape == (channels, size, size)
    net = "ddpm.nets.dit.DiT" if option.startswith("dit") else "ddpm.nets.unet.UNet"
    assert module.hparams.config["model"]["_target_"] == net


@pytest.mark.parametrize("option", options("trainer"))
def test_trainers_instantiate(option, tmp_path):
    if option == "gpu" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    overrides = [f"trainer={option}"]
    if option == "ddp" and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")
    cfg = compose_train(overrides, tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("option", options("precision"))
def test_precisions_instantiate(option, tmp_path):
    if option == "16-mixed" and not torch.cuda.is_available():
        pytest.skip("fp16 autocast needs a CUDA device")
    cfg = compose_train([f"precision={option}"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    expected = {"auto": "16-mixed" if torch.cuda.is_available() else "32-true"}
    assert trainer.precision == expected.get(option, option)


@pytest.mark.parametrize("option", options("logger"))
def test_loggers_instantiate(option, tmp_path):
    cfg = compose_train([f"logger={option}"], tmp_path)
    loggers = build_loggers(cfg.logger)
    assert len(loggers) == (0 if option == "none" else 1)


def test_lr_monitor_is_left_out_without_a_logger(tmp_path):
    callbacks = build_callbacks(compose_train([], tmp_path), has_logger=False)
    assert "LearningRateMonitor" not in [type(cb).__name__ for cb in callbacks]


def test_progress_bar_is_left_out_when_disabled(tmp_path):
    cfg = compose_train(["+trainer.enable_progress_bar=false"], tmp_path)
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=False)
    assert "TQDMProgressBar" not in [type(cb).__name__ for cb in trainer.callbacks]


def test_callbacks_instantiate_with_ema_then_guard_last(tmp_path):
    callbacks = build_callbacks(compose_train([], tmp_path))
    names = [type(cb).__name__ for cb in callbacks]
    # EMA after the validation-time callbacks; the guard after EMA, so a checkpoint it
    # writes at the end of a step includes that step's EMA update
    assert names[-2:] == ["PowerEMA", "TrainerGuard"]  # ema=power, the default
    assert {
        "ModelCheckpoint",
        "SampleGrid",
        "LossByTimestep",
        "SampleQuality",
        "LearningRateMonitor",
        "ProgressBar",
    } <= set(names)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(option, tmp_path):
    cfg = compose_train([f"experiment={option}"], tmp_path)
    assert build_module(cfg) is not None


def test_common_overrides_work(tmp_path):
    cfg = compose_train(
        [
            "trainer.max_steps=200",
            "model=small",
            "schedule=linear",
            "data.batch_size=64",
            "data.image_size=16",
        ],
        tmp_path,
    )
    assert cfg.trainer.max_steps == 200 and cfg.data.batch_size == 64
    assert cfg.schedule.name == "linear" and cfg.model.base_channels == 64
    assert cfg.model.image_size == 16  # the data config feeds the model: one place to edit
    assert Path(cfg.paths.output_dir) == tmp_path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], (0.75, -0.4, 10)),  # the default: the digits' tuned values
        (["data=folder", "data.root=/imgs"], (0.5, -1.2, 18)),  # Karras et al.'s
        (["data=cifar10"], (0.5, -1.2, 18)),
        (["data=mnist"], (0.5, -1.2, 18)),
        (["data=fashion_mnist"], (0.5, -1.2, 18)),
    ],
)
def test_edm_values_that_depend_on_the_data_come_with_the_data(data, expected):
    cfg = compose_train(data)
    pre = cfg.objective.preconditioning
    assert (pre.sigma_data, pre.p_mean, cfg.sampler.steps) == expected
    set_by_user = compose_train(
        [*data, "objective.preconditioning.sigma_data=0.3", "sampler.steps=7"]
    )
    assert set_by_user.objective.preconditioning.sigma_data == 0.3
    assert set_by_user.sampler.steps == 7
    assert set_by_user.objective.preconditioning.p_mean == expected[1]
