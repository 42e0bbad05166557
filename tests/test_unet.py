import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from ddpm.nets.unet import UNet, timestep_embedding
from tests.conftest import compose_train

MODELS = ["tiny", "small", "base", "ddpm_cifar10"]
# (image size, channels) each model is meant for
SIZES = {"tiny": (8, 1), "small": (28, 1), "base": (32, 3), "ddpm_cifar10": (32, 3)}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_size_maps_x_to_its_own_shape(model):
    size, channels = SIZES[model]
    cfg = compose_train([f"model={model}", f"data.image_size={size}", f"data.channels={channels}"])
    net = instantiate(cfg.model)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_ddpm_cifar10_has_ho_et_al_parameter_count():
    cfg = compose_train(["model=ddpm_cifar10", "data.image_size=32", "data.channels=3"])
    n = sum(p.numel() for p in instantiate(cfg.model).parameters())
    assert n == 35_746_307  # Ho et al. 2020's CIFAR-10 model (diffusion_tf: 35.7M)


@pytest.mark.parametrize("dim", [4, 8, 32])
def test_time_embedding_is_the_closed_form_sinusoid(dim):
    """emb(t)_i = sin(t * 10000^(-i / (h - 1))), emb(t)_(h+i) = cos(same), h = dim / 2
    (Ho et al.'s get_timestep_embedding), at several t and every frequency."""
    t = [0, 1, 7, 250, 999]
    emb = timestep_embedding(torch.tensor(t), dim).double()
    half = dim // 2
    for row, step in enumerate(t):
        for i in range(half):
            angle = step * 10000.0 ** (-i / (half - 1))
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=2e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(angle), abs=2e-4)
    assert emb[:, 0].tolist() == pytest.approx([math.sin(s) for s in t], abs=2e-4)  # w_0 = 1
    assert emb[:, half - 1].tolist() == pytest.approx([math.sin(s / 1e4) for s in t], abs=1e-6)


def _small_net(**kwargs):
    defaults = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2))
    return UNet(**{**defaults, "num_res_blocks": 1, "attention_resolutions": (4,), **kwargs})


def test_ho_initialisation_zeroes_the_residual_outputs_and_is_xavier_elsewhere():
    """Ho et al.'s init (diffusion_tf nn.default_init: variance scaling, fan_avg, uniform;
    init_scale=0 for each ResBlock's conv2, the attention proj_out and the output conv)."""
    torch.manual_seed(0)
    net = _small_net(init="ho")
    zeroed = {"conv_out"} | {
        name.rsplit(".", 1)[0]
        for name, _ in net.named_parameters()
        if name.endswith(("conv2.weight", "attn.proj.weight")) or ".proj.weight" in name
    }
    for name, module in net.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        assert torch.count_nonzero(module.bias) == 0, name
        if name in zeroed:
            assert torch.count_nonzero(module.weight) == 0, name
            continue
        w = module.weight
        receptive = w[0, 0].numel() if w.ndim == 4 else 1
        fan_out, fan_in = w.shape[0] * receptive, w.shape[1] * receptive
        if name.endswith("qkv"):
            fan_out //= 3  # three C -> C maps
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound, name
        assert w.abs().max() > 0.8 * bound, name  # filled, not merely small
    assert {n for n in zeroed if "proj" in n} and {n for n in zeroed if "conv2" in n}
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(net(x, torch.tensor([3, 9]))) == 0  # the first prediction is 0
    torch.manual_seed(0)
    default = _small_net(init="torch")
    assert torch.count_nonzero(default.conv_out.weight) > 0
    with pytest.raises(ValueError, match=r"model\.init='xavier' is unknown"):
        _small_net(init="xavier")


def test_output_depends_on_the_timestep():
    net = UNet(
        image_size=8,
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        init="torch",  # Ho's init zeroes the output layer: every prediction starts at 0
    )
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1])), net(x, torch.tensor([500])))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"image_size": 12, "channel_mults": (1, 2, 2, 2)},
            "data.image_size=12 must be divisible by 8",
        ),
        (
            {"image_size": 8, "attention_resolutions": (16,)},
            "includes [16], which this net never reaches",
        ),
        ({"image_size": 8, "base_channels": 7}, "model.base_channels=7 must be an even integer"),
        (
            {"image_size": 8, "base_channels": 2},
            "model.base_channels=2 must be an even integer >= 4",
        ),
        ({"image_size": 8, "dropout": 1.5}, "model.dropout=1.5 must lie in [0, 1)"),
        (
            {"image_size": 8, "attention_heads": 3, "attention_resolutions": (8,)},
            "attention_heads=3",
        ),
    ],
)
def test_bad_architecture_is_refused_with_the_key(kwargs, message):
    defaults = {
        "in_channels": 1,
        "base_channels": 8,
        "channel_mults": (1, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (),
    }
    with pytest.raises(ValueError) as err:
        UNet(**{**defaults, **kwargs})
    assert message in str(err.value)
