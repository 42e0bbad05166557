"""Class conditioning and classifier-free guidance (Ho & Salimans 2022)."""

import pytest
import torch

from ddpm.diffusion.guidance import guided_output
from ddpm.diffusion.objectives import DiffusionLoss
from ddpm.diffusion.samplers import DDIMSampler, DPMSolverSampler
from ddpm.diffusion.schedules import NoiseSchedule
from ddpm.nets.unet import UNet


def small_net(num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    return UNet(
        image_size=8,
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        dropout=0.0,
        num_classes=num_classes,
        init="torch",  # an untrained net whose output depends on its input (Ho's init: 0)
    )


def conditional_net(num_classes: int = 10) -> UNet:
    net = small_net(num_classes)
    with torch.no_grad():  # a fresh net's class embedding is random, not zero: keep it so
        net.class_embed.weight.normal_()
    return net.eval()


def test_changing_the_label_changes_the_output():
    net = conditional_net()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900])
    out3 = net(x, t, y=torch.full((4,), 3))
    assert not torch.allclose(out3, net(x, t, y=torch.full((4,), 7)))
    assert not torch.allclose(out3, net(x, t, y=torch.full((4,), -1)))  # the null class
    assert torch.equal(out3, net(x, t, y=torch.full((4,), 3)))


def test_guidance_zero_is_the_conditional_prediction_and_batched_equals_two_calls():
    net = conditional_net()
    x, t, y = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,)), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(guided_output(net, x, t, y, 0.0), net(x, t, y=y))
        cond, uncond = net(x, t, y=y), net(x, t, y=torch.full_like(y, -1))
        expected = (1 + 2.5) * cond - 2.5 * uncond  # Ho & Salimans 2022, Eq. 6
        assert torch.allclose(guided_output(net, x, t, y, 2.5), expected, atol=1e-5)


def test_guidance_is_one_batched_network_call():
    calls = []

    def model(x, t, y=None):
        calls.append(x.shape[0])
        return x * (1 + (y.view(-1, 1, 1, 1) >= 0))

    schedule = NoiseSchedule.from_name("cosine", num_timesteps=50)
    DPMSolverSampler(steps=5).sample(
        model, schedule, (3, 1, 2, 2), y=torch.tensor([1, 2, 3]), guidance_scale=2.0
    )
    assert calls == [6] * 5  # conditional + unconditional halves of one batch per step


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_guided_sampling_runs_for_every_prediction_type(prediction_type):
    net = conditional_net()
    schedule = NoiseSchedule.from_name("cosine", num_timesteps=100)
    with torch.no_grad():
        a, b = (
            DDIMSampler(steps=5).sample(
                net, schedule, (2, 1, 8, 8), prediction_type,
                generator=torch.Generator().manual_seed(0),
                y=torch.tensor([label, label]), guidance_scale=3.0,
            )
            for label in (1, 8)
        )  # fmt: skip
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_label_dropout_rate_is_honoured():
    seen = []

    def model(x, t, y=None):
        seen.append(y)
        return torch.zeros_like(x)

    schedule = NoiseSchedule.from_name("cosine", num_timesteps=100)
    x0, y = torch.zeros(20_000, 1, 1, 1), torch.randint(0, 10, (20_000,))
    DiffusionLoss(cond_drop_prob=0.3)(model, schedule, x0, y=y)
    dropped = seen[-1] == -1
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(seen[-1][~dropped], y[~dropped])
    DiffusionLoss(cond_drop_prob=0.3)(model, schedule, x0, y=y, drop_labels=False)
    assert torch.equal(seen[-1], y)  # validation: labels as given


def test_conditioning_mistakes_get_clear_messages():
    net = conditional_net()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    with pytest.raises(ValueError, match=r"class-conditional \(10 classes\): pass y=labels"):
        net(x, t)
    plain = small_net()
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, y=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"objective\.cond_drop_prob=1\.0 must lie in \[0, 1\)"):
        DiffusionLoss(cond_drop_prob=1.0)
