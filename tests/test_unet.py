import pytest
import torch
from hydra.utils import instantiate

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
    assert n == pytest.approx(35.7e6, rel=0.01)


def test_time_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.allclose(emb[1, 0], torch.sin(torch.tensor(7.0)))


def test_output_depends_on_the_timestep():
    net = UNet(
        image_size=8,
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
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
