"""Samplers against an analytic model: for data x0 ~ N(m, s^2 I), the optimal noise
predictor is known in closed form, so the sampler must return mean m and std s."""

import pytest
import torch

from ddpm.rng import sample_generators
from ddpm.samplers import DDPMSampler, spaced_timesteps
from ddpm.schedules import NoiseSchedule


def gaussian_eps_model(schedule: NoiseSchedule, m: float, s: float):
    """E[eps | x_t] for x0 ~ N(m, s^2): sqrt(1-abar)(x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)."""

    def model(x_t, t):
        abar = schedule.alphas_cumprod[t].view(-1, *([1] * (x_t.ndim - 1))).double()
        eps = (1 - abar).sqrt() * (x_t.double() - abar.sqrt() * m) / (abar * s**2 + 1 - abar)
        return eps.to(x_t.dtype)

    return model


@pytest.mark.parametrize(
    ("name", "steps", "clip"),
    [("linear", None, False), ("cosine", None, True), ("linear", 250, False)],
)
def test_ddpm_sampler_recovers_gaussian_data(name, steps, clip):
    schedule = NoiseSchedule.from_name(name, num_timesteps=1000)
    m, s = 0.3, 0.2
    out = DDPMSampler(steps=steps, clip_denoised=clip).sample(
        gaussian_eps_model(schedule, m, s),
        schedule,
        (20_000, 1, 1, 1),
        generator=torch.Generator().manual_seed(0),
    )
    assert out.mean().item() == pytest.approx(m, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.05)


def test_one_step_is_the_reference_ancestral_step():
    """A single T=1 step adds no noise and returns the reference mean exactly."""
    schedule = NoiseSchedule(torch.tensor([0.3], dtype=torch.float64))
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    eps = torch.full_like(x_T, 0.25)
    out = DDPMSampler(clip_denoised=False).sample(
        lambda x, t: eps, schedule, x_T.shape, generator=torch.Generator().manual_seed(5)
    )
    beta = torch.tensor(0.3)
    reference = (x_T - beta / (1 - (1 - beta)).sqrt() * eps) / (1 - beta).sqrt()
    assert torch.allclose(out, reference, atol=1e-6)


def test_same_seed_same_samples_whatever_the_batch():
    schedule = NoiseSchedule.from_name("linear", num_timesteps=50)
    model = gaussian_eps_model(schedule, 0.0, 0.5)
    sampler = DDPMSampler()
    whole = sampler.sample(model, schedule, (6, 1, 2, 2), generator=sample_generators(7, range(6)))
    part = sampler.sample(model, schedule, (2, 1, 2, 2), generator=sample_generators(7, [4, 5]))
    assert torch.equal(whole[4:], part)
    other = sampler.sample(model, schedule, (2, 1, 2, 2), generator=sample_generators(8, [4, 5]))
    assert not torch.allclose(other, part)


def test_spaced_timesteps():
    assert spaced_timesteps(10, None) == list(range(9, -1, -1))
    steps = spaced_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0
    assert steps == sorted(steps, reverse=True)
    assert spaced_timesteps(100, 250) == list(range(99, -1, -1))  # capped at T
    with pytest.raises(ValueError, match=r"sampler\.steps=0 must be >= 1"):
        spaced_timesteps(1000, 0)


def test_bad_sampler_arguments_are_refused():
    with pytest.raises(ValueError, match=r"sampler\.steps=0"):
        DDPMSampler(steps=0)
    schedule = NoiseSchedule.from_name("cosine", num_timesteps=10)
    with pytest.raises(ValueError, match="prediction_type='x0' is unknown"):
        DDPMSampler().sample(lambda x, t: x, schedule, (1, 1, 1, 1), prediction_type="x0")


def test_index_generators_are_distinct_and_reproducible():
    from ddpm.rng import index_generator

    seeds = {index_generator(0, i).initial_seed() for i in range(10_000)}
    assert len(seeds) == 10_000
    assert index_generator(3, 5).initial_seed() == index_generator(3, 5).initial_seed()
    assert index_generator(3, 5).initial_seed() != index_generator(4, 5).initial_seed()
    with pytest.raises(ValueError, match="must be >= 0"):
        index_generator(-1, 0)
