"""The DiT backbone (ddpm.nets.dit): the UNet's call contract, adaLN-Zero's zero start,
classifier-free guidance through the null class, the fixed positions, the paper's sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ddpm.diffusion.guidance import guided_output
from ddpm.nets.dit import DiT, sincos_positions
from tests.conftest import CONF, TINY, draw_from, train_run


def small(**kw) -> DiT:
    args = dict(image_size=8, in_channels=1, patch_size=2, hidden_size=48, depth=2, num_heads=3)
    return DiT(**{**args, **kw})


def perturbed(net: DiT, seed: int = 0) -> DiT:
    """The net with every parameter moved off its (partly zero) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_the_output_has_the_input_shape_for_every_patch_size(patch):
    net = perturbed(small(patch_size=patch, in_channels=3))
    x = torch.randn(4, 3, 8, 8)
    out = net(x, torch.rand(4))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.grid**2 == (8 // patch) ** 2


@pytest.mark.parametrize("patch, channels", [(1, 1), (2, 1), (2, 3), (4, 3)])
def test_tokens_and_patches_line_up(patch, channels):
    """The patch embedding reads p x p patches in unfold's row-major order, and
    unpatchify writes patch channels (p, q, c) back to the same pixels: a token's patch
    comes back where it was cut from."""
    net = perturbed(small(patch_size=patch, in_channels=channels, out_channels=channels))
    x = torch.randn(2, channels, 8, 8)
    # unfold: [B, C p p, g^2] with (c, p, q) order -> [B, g^2, C p p]
    cut = torch.nn.functional.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)
    w, bias = net.x_embedder.weight, net.x_embedder.bias  # [D, C, p, p]
    embedded = net.x_embedder(x).flatten(2).transpose(1, 2)  # [B, g^2, D]
    assert torch.allclose(embedded, cut @ w.reshape(w.shape[0], -1).T + bias, atol=1e-5)
    # unpatchify expects (p, q, c) per token: reorder unfold's (c, p, q)
    tokens = cut.reshape(2, -1, channels, patch, patch).permute(0, 1, 3, 4, 2).flatten(2)
    assert torch.equal(net.unpatchify(tokens), x)


def test_adaln_zero_starts_as_a_zero_map_and_learns():
    net = small(num_classes=10, augment_dim=9)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.rand(3), y=torch.tensor([0, 5, -1]), aug=torch.randn(3, 9))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: zero gates, zero decoder
    out.square().sum().backward()  # gradients reach the decoder first
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = (net(x, torch.rand(3)) - x).square().mean()
        loss.backward()
        opt.step()
    assert net(x, torch.rand(3)).abs().sum() > 0


def test_labels_and_the_null_class_steer_the_output_and_guidance_combines_them():
    net = perturbed(small(num_classes=10)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    a = net(x, t, y=torch.tensor([1, 1]))
    b = net(x, t, y=torch.tensor([2, 2]))
    null = net(x, t, y=torch.tensor([-1, -1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    assert torch.allclose(net(x, t), null)  # no labels: the null class
    w = 2.0
    guided = guided_output(net, x, t, y=torch.tensor([1, 1]), guidance_scale=w)
    assert torch.allclose(guided, a + w * (a - null), atol=1e-5)


def test_an_unconditional_net_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        small()(torch.randn(1, 1, 8, 8), torch.rand(1), y=torch.tensor([0]))


def test_augmentation_labels_enter_the_conditioning():
    net = perturbed(small(augment_dim=9)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert not torch.allclose(net(x, t, aug=torch.zeros(2, 9)), net(x, t, aug=torch.ones(2, 9)))


def test_the_positions_are_fixed_sincos_and_not_learned():
    net = small(hidden_size=48)
    assert "pos_embed" not in net.state_dict()
    assert all("pos_embed" not in name for name, _ in net.named_parameters())
    pos = sincos_positions(4, 48)  # [16, 48]
    assert pos.shape == (16, 48) and torch.equal(net.pos_embed[0], pos)
    # token 0 is (row 0, col 0): sin 0 = 0 and cos 0 = 1 in each half
    assert torch.equal(pos[0, :12], torch.zeros(12)) and torch.equal(pos[0, 12:24], torch.ones(12))
    assert len({tuple(p.tolist()) for p in pos}) == 16  # every token its own position


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(patch_size=3), "model.patch_size=3"),
        (dict(hidden_size=50), "model.hidden_size=50"),
        (dict(depth=0), "model.depth=0"),
        (dict(num_classes=-1), "model.num_classes=-1"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        small(**overrides)


# Peebles & Xie 2023, Table 1 (millions of parameters; ImageNet 256 px, 32x32x4 latents,
# patch 2, 1,000 classes, 8 output channels for the learned sigma). DiT counts its fixed
# positions (a non-trainable parameter there, a buffer here) among the parameters.
PAPER_MILLIONS = {"dit_s": 33, "dit_b": 130, "dit_l": 458, "dit_xl": 675}


@pytest.mark.parametrize("option", sorted(PAPER_MILLIONS))
def test_the_configs_have_the_papers_sizes(option):
    cfg = OmegaConf.load(CONF / "model" / f"{option}.yaml")
    raw = OmegaConf.to_container(cfg, resolve=False)
    args = {k: v for k, v in raw.items() if k not in ("_target_", "image_size", "in_channels")}
    with torch.device("meta"):  # no memory: DiT-XL is 675M parameters
        net = DiT(image_size=32, in_channels=4, out_channels=8, num_classes=1000, **args)
    params = sum(p.numel() for p in net.parameters())
    positions = net.pos_embed.numel()  # 256 tokens x hidden_size
    # the table rounds (DiT-B is 130.51M); DiT-XL/2's exact count is the reference code's
    assert abs((params + positions) / 1e6 - PAPER_MILLIONS[option]) < 0.6
    if option == "dit_xl":
        assert params + positions == 675_129_632


def test_train_then_sample_with_a_class_conditional_dit(tmp_path):
    """model=dit_s (shrunk) through train.py with the default objective (EDM), callbacks
    (EMA, grids, val/fid) and data.conditional=true, then sample.py from the checkpoint
    alone with classifier-free guidance, with another sampler, and autoguided."""
    tiny = [o for o in TINY if not o.startswith("model.")]
    shrink = ["model.hidden_size=24", "model.depth=1", "model.num_heads=2", "model.patch_size=4"]
    run_dir = tmp_path / "dit"
    ckpt, config = train_run(
        run_dir, "model=dit_s", *shrink, *tiny, "data.conditional=true", "logger=csv", cwd=tmp_path
    )
    assert config["model"]["_target_"] == "ddpm.nets.dit.DiT"
    assert config["model"]["num_classes"] == 10 and config["model"]["patch_size"] == 4
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert any(r.get("val/fid") for r in rows)
    for name, extra in (
        ("cfg", ["guidance_scale=2.0", "class_label=3"]),
        ("ddim", ["sampler=ddim"]),
    ):
        images, _ = draw_from(ckpt, tmp_path / name, *extra, cwd=tmp_path)
        assert images.shape == (3, 8, 8, 1) and images.std() > 0
    # autoguided by its own EMA at step 3 (class-conditional, alone and with CFG on top)
    nfe = {}
    for name, extra in (
        ("cond", ["class_label=3"]),
        ("auto", ["class_label=3", "guide_step=3", "guide_weight=2"]),
        ("auto_cfg", ["class_label=3", "guide_step=3", "guide_weight=2", "guidance_scale=1"]),
    ):
        images, _ = draw_from(ckpt, tmp_path / name, *extra, cwd=tmp_path)
        info = json.loads((tmp_path / name / "samples.json").read_text())
        nfe[name] = (images, info["nfe"], info["guidance_scale"])
    assert nfe["auto"][1] == 2 * nfe["cond"][1] and nfe["auto_cfg"][1] == 4 * nfe["cond"][1]
    assert nfe["auto"][2] == 0.0  # a guide alone: no classifier-free guidance
    assert not np.array_equal(nfe["auto"][0], nfe["cond"][0])
