"""DiffusionModule under a real Lightning Trainer, composed from conf/."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ddpm.runs.build import build_callbacks, build_module, load_module
from ddpm.runs.loggers import build_loggers
from ddpm.utils.images import make_grid, to_uint8
from tests.conftest import TINY, compose_train


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    cfg = compose_train([*TINY, "logger=csv", "+trainer.enable_progress_bar=false"], out)
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = build_loggers(cfg.logger)
    callbacks = build_callbacks(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=datamodule)
    return out, trainer, module


def test_fit_writes_checkpoints_and_one_grid_per_validation(fitted):
    out, trainer, _ = fitted
    assert trainer.global_step == 6
    assert (out / "checkpoints" / "last.ckpt").is_file()
    best = [p for p in (out / "checkpoints").glob("best-*.ckpt")]
    assert len(best) == 1
    grids = sorted((out / "samples").glob("grid_*.png"))
    assert [g.name.split("step=")[1] for g in grids] == ["0000003.png", "0000006.png"]
    metrics = trainer.callback_metrics
    assert {"val/loss", "train/loss", "val/fid", "val/kid", "val/kid_std"} <= set(metrics)
    assert float(metrics["val/fid"]) > 0
    assert any(key.startswith("val_loss_by_sigma/sigma") for key in metrics)  # edm_digits
    assert len(list((out / "samples").glob("ema_vs_raw_step=*.png"))) == 2
    assert len(list((out / "samples").glob("trajectory_step=*.png"))) == 2
    assert len(list((out / "loss_by_sigma").glob("step=*.png"))) == 2


def test_trajectory_strip_has_one_row_per_sample_and_a_column_per_frame(fitted):
    out, _, _ = fitted
    strip = np.asarray(Image.open(sorted((out / "samples").glob("trajectory_*.png"))[-1]))
    tile = 32 + 2  # 8x8 images enlarged 4x, plus the 2-pixel gap
    assert strip.shape[:2] == (2 * tile + 2, (8 + 1) * tile + 2)  # 2 samples, 8 frames + x_0


def test_checkpoint_holds_ema_weights_and_config(fitted):
    out, _, _ = fitted
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA moved apart
    assert ckpt["hyper_parameters"]["config"]["model"]["base_channels"] == 8
    assert not any(k.startswith("schedule.") for k in ema)  # derived, rebuilt from config


def test_grid_was_drawn_with_the_ema_weights(fitted):
    """The last grid equals what the checkpoint's (EMA) weights draw from the same seed."""
    out, _, _ = fitted
    module = load_module(out / "checkpoints" / "last.ckpt")
    expected = make_grid(to_uint8(module.sample(4, seed=0)))
    grid = sorted((out / "samples").glob("grid_*.png"))[-1]
    assert np.array_equal(np.asarray(Image.open(grid))[..., None], expected)


def test_validation_loss_is_reproducible(fitted):
    """val/loss uses fixed (t, noise) per image: two evaluations agree exactly."""
    _, trainer, module = fitted
    first = trainer.validate(module, datamodule=trainer.datamodule, verbose=False)[0]["val/loss"]
    second = trainer.validate(module, datamodule=trainer.datamodule, verbose=False)[0]["val/loss"]
    assert first == second


def test_sample_is_batch_size_invariant(fitted):
    out, _, _ = fitted
    module = load_module(out / "checkpoints" / "last.ckpt")
    whole = module.sample(5, seed=3)
    split = module.sample(5, seed=3, batch_size=2)
    assert whole.shape == (5, 1, 8, 8)
    # the same samples up to float rounding: convolutions sum in another order at another
    # batch size, and EDM's sampler (the default) starts from noise of sigma 80
    assert torch.allclose(whole, split, atol=1e-4)
    levels = to_uint8(whole).astype(np.int16) - to_uint8(split).astype(np.int16)
    assert np.abs(levels).max() <= 1
    assert not torch.allclose(whole, module.sample(5, seed=4))


def test_load_module_strips_torch_compile_prefix(fitted, tmp_path):
    out, _, _ = fitted
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["state_dict"] = {
        k.replace("net.", "net._orig_mod."): v for k, v in ckpt["state_dict"].items()
    }
    torch.save(ckpt, tmp_path / "compiled.ckpt")
    module = load_module(tmp_path / "compiled.ckpt")
    reference = load_module(out / "checkpoints" / "last.ckpt")
    for (name, a), b in zip(
        module.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_can_keep_the_best_by_fid(tmp_path):
    cfg = compose_train(
        [
            *TINY,
            "logger=csv",
            "callbacks.checkpoint.monitor=val/fid",
            "callbacks.checkpoint.filename='best-fid={val/fid:.2f}'",
            "+trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    trainer = instantiate(
        cfg.trainer,
        callbacks=build_callbacks(cfg),
        logger=build_loggers(cfg.logger),
    )
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    checkpoint = trainer.checkpoint_callback
    assert checkpoint.monitor == "val/fid"
    assert checkpoint.best_model_score is not None
    assert "best-fid=" in checkpoint.best_model_path
