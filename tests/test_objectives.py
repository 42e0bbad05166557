import math

import pytest
import torch

from ddpm.diffusion.objectives import DiffusionLoss, fixed_timesteps_and_noise
from ddpm.diffusion.schedules import NoiseSchedule


def test_loss_is_per_sample_mse_against_the_noise():
    s = NoiseSchedule.from_name("linear", num_timesteps=50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 4, 4, generator=g)
    noise = torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 20, 30, 49])
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    loss = DiffusionLoss("epsilon")(zero_model, s, x0, t, noise)
    assert loss.shape == (5,)
    assert torch.allclose(loss, noise.pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_perfect_model_has_zero_loss(prediction_type):
    s = NoiseSchedule.from_name("cosine", num_timesteps=100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    noise = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 5, 50, 98])
    # alpha_bar of the cosine schedule, Nichol & Dhariwal 2021 Eq. 17 (the 0.999 beta
    # clip bites at t = 99 of 100 only): f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), abar = f(t) / f(0)
    f = lambda u: math.cos(math.pi / 2 * (u / 100 + 0.008) / 1.008) ** 2  # noqa: E731
    abar = torch.tensor([f(int(u) + 1) / f(0) for u in t]).view(-1, 1, 1, 1)
    a, sigma = abar.sqrt(), (1 - abar).sqrt()

    def oracle(x_t, t_):
        """The exact answer, read from x_t alone given x_0: x_t = a x_0 + sigma eps
        (Ho et al. Eq. 4), v = a eps - sigma x_0 (Salimans & Ho 2022, Sec. 4)."""
        eps = (x_t - a * x0) / sigma
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sigma * x0}[prediction_type]

    loss = DiffusionLoss(prediction_type)(oracle, s, x0, t, noise)
    assert torch.allclose(loss, torch.zeros(4), atol=1e-8)
    off = lambda x_t, t_: oracle(x_t, t_) + 0.1  # noqa: E731 - any other model is penalised
    worse = DiffusionLoss(prediction_type)(off, s, x0, t, noise)
    assert torch.allclose(worse, torch.full((4,), 0.01), rtol=1e-3)


def test_timesteps_are_drawn_uniformly_over_all_of_them():
    s = NoiseSchedule.from_name("cosine", num_timesteps=10)
    seen: list[torch.Tensor] = []

    def spy(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    torch.manual_seed(0)
    DiffusionLoss()(spy, s, torch.zeros(20_000, 1, 1, 1))
    counts = torch.bincount(seen[0], minlength=10)
    assert counts.shape == (10,) and seen[0].min() == 0 and seen[0].max() == 9
    assert (counts.float() / 20_000 - 0.1).abs().max() < 0.01


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match=r"objective\.prediction_type='noise' is unknown"):
        DiffusionLoss("noise")


def test_fixed_validation_noise_depends_on_the_index_only():
    t_all, n_all = fixed_timesteps_and_noise([0, 1, 2, 3], (1, 4, 4), 1000, seed=3)
    t_part, n_part = fixed_timesteps_and_noise([2, 3], (1, 4, 4), 1000, seed=3)
    assert torch.equal(t_all[2:], t_part) and torch.equal(n_all[2:], n_part)
    t_other, _ = fixed_timesteps_and_noise(list(range(50)), (1, 4, 4), 1000, seed=4)
    assert t_all.dtype == torch.long and int(t_other.min()) >= 0 and int(t_other.max()) < 1000
    assert len(set(t_other.tolist())) > 30  # spread over the chain, not one timestep


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_match_the_closed_form(prediction_type):
    """Hang et al. 2023: every parameterisation's weighted loss equals
    min(SNR, gamma) * ||x0 - x0_hat||^2."""
    s = NoiseSchedule.from_name("cosine", num_timesteps=1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    noise = torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 50, 200, 500, 800, 999])
    wrong = torch.randn(6, 1, 4, 4, generator=g)  # any network output
    loss = DiffusionLoss(prediction_type, weighting="min_snr", min_snr_gamma=5.0)(
        lambda x, t_: wrong, s, x0, t, noise
    )
    x_t = s.q_sample(x0, t, noise)
    x0_hat, _ = s.predict_x0_eps(x_t, t, wrong, prediction_type)
    snr = s.snr(t).double()
    expected = snr.clamp(max=5.0) * (x0_hat - x0).double().pow(2).flatten(1).mean(1)
    assert torch.allclose(loss.double(), expected, rtol=2e-3)
    weights = {
        "epsilon": snr.clamp(max=5) / snr,
        "sample": snr.clamp(max=5),
        "v_prediction": snr.clamp(max=5) / (snr + 1),
    }[prediction_type]
    uniform = DiffusionLoss(prediction_type)(lambda x, t_: wrong, s, x0, t, noise)
    assert torch.allclose(loss.double(), weights * uniform.double(), rtol=1e-5)


def test_bad_objective_values_are_refused():
    with pytest.raises(ValueError, match=r"objective\.weighting='snr' is unknown"):
        DiffusionLoss(weighting="snr")
    with pytest.raises(ValueError, match=r"objective\.min_snr_gamma=0 must be > 0"):
        DiffusionLoss(weighting="min_snr", min_snr_gamma=0)
