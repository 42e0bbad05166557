"""The UNet at 64-256 px: ADM's nets at the papers' sizes (parameter counts), their
options, activation checkpointing (identical gradients), the images64 preset end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ddpm.nets.unet import UNet
from ddpm.runs.cli import train
from tests.conftest import TINY, compose_train

# Dhariwal & Nichol 2021 report 296M, 422M and 554M (learned variances, 1,000 classes);
# their code gives these counts for the unconditional nets with 3 output channels.
ADM_PARAMETERS = {64: 295_131_267, 128: 420_498_691, 256: 552_807_171}


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("size", [64, 128, 256])
def test_adm_nets_have_the_papers_parameter_counts(size):
    cfg = compose_train([f"model=unet{size}", "data=folder", "data.root=x",
                         f"data.image_size={size}"])  # fmt: skip
    with torch.device("meta"):  # the full-size net, without allocating its weights
        net = instantiate(cfg.model)
    assert _count(net) == ADM_PARAMETERS[size]
    assert net.checkpointing is False and cfg.model.resblock_updown and cfg.model.scale_shift_norm


@pytest.mark.parametrize("size", [128, 256])
def test_reduced_width_adm_nets_take_a_training_step(size):
    """The 128 and 256 px nets at their resolution and depth, 32 channels wide, one
    checkpointed training step: finite gradients everywhere."""
    cfg = compose_train([f"model=unet{size}", "data=folder", "data.root=x",
                         f"data.image_size={size}", "model.base_channels=32",
                         "model.checkpointing=true", "model.dropout=0.1"])  # fmt: skip
    net = instantiate(cfg.model)
    x = torch.randn(1, 3, size, size)
    out = net(x, torch.tensor([3.0]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_activation_checkpointing_gives_identical_gradients():
    """Every residual and attention block recomputed in the backward pass (dropout on:
    the recomputation replays its masks): the same output and the same gradients."""
    kwargs = dict(image_size=16, in_channels=3, base_channels=64, channel_mults=(1, 2),
                  num_res_blocks=2, attention_resolutions=(16, 8), attention_head_channels=32,
                  resblock_updown=True, scale_shift_norm=True, dropout=0.1)  # fmt: skip
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 700.0])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = UNet(**kwargs, checkpointing=checkpointing)
        torch.manual_seed(1)
        loss = net(x, t).square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_adm_blocks_resample_inside_the_residual_block_and_scale_shift():
    net = UNet(image_size=16, in_channels=3, base_channels=32, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=(8,), resblock_updown=True,
               scale_shift_norm=True)  # fmt: skip
    kinds = [type(b).__name__ for b in net.down]
    assert kinds == ["LevelBlock", "ResBlock", "LevelBlock"]  # the down-sampler is a ResBlock
    assert net.down[1].resample == "down" and net.down[1].temb_proj.out_features == 64
    assert any(getattr(b, "resample", None) == "up" for b in net.up)
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])).shape == (2, 3, 16, 16)


def test_images64_preset_trains_end_to_end(tmp_path):
    """experiment=images64 on a fabricated 64x64 folder, its net at a quarter of the
    width (32 channels, 32 per head), two steps, the default callbacks on (grids, FID
    with digits features: Inception would need a download), checkpoint and sampler."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        pixels = rng.integers(0, 256, size=(70, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg")
    overrides = [o for o in TINY if not o.startswith(("model.", "data.", "schedule."))]
    cfg = compose_train(["experiment=images64", f"data.root={folder}", *overrides,
                         "model.base_channels=32", "model.attention_head_channels=32",
                         "data.global_batch_size=2",
                         "data.val_fraction=0.25", "trainer.max_steps=2",
                         "trainer.val_check_interval=2", "eval.feature_extractor=digits",
                         "sampler.steps=2", "precision=32-true", "logger=csv"],
                        tmp_path / "run")  # fmt: skip
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    config = ckpt["hyper_parameters"]["config"]
    assert ckpt["global_step"] == 2 and config["data"]["image_size"] == 64
    assert config["objective"]["preconditioning"]["sigma_data"] == 0.5
    assert config["objective"]["preconditioning"]["p_mean"] == -1.2
    assert config["model"]["resblock_updown"] and config["data"]["batch_size"] == 2
