import itertools
import math
import operator
import re

import pytest
import torch

from ddpm.diffusion.schedules import (
    NoiseSchedule,
    cosine_beta_schedule,
    linear_beta_schedule,
)


def test_linear_schedule_matches_ho_et_al():
    s = NoiseSchedule.from_name("linear", num_timesteps=1000)
    assert s.num_timesteps == 1000
    assert s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    diffs = s.betas.double().diff()
    assert torch.allclose(diffs, diffs.new_full(diffs.shape, (0.02 - 1e-4) / 999), atol=1e-8)


def test_linear_schedule_scales_with_num_timesteps():
    betas = linear_beta_schedule(500)
    assert betas[0].item() == pytest.approx(2e-4)
    assert betas[-1].item() == pytest.approx(0.04)


def test_cosine_schedule_closed_form():
    T, s_ = 1000, 0.008
    sched = NoiseSchedule.from_name("cosine", num_timesteps=T)

    def f(t: float) -> float:
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    betas = cosine_beta_schedule(T)
    assert betas.dtype == torch.float64
    assert betas.max().item() == pytest.approx(0.999)
    for t in (0, 1, 10, 500, 900):
        # alpha_bar at zero-based t covers steps 1..t+1 of the paper: f(t+1) / f(0).
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


def test_buffers_are_float32_consistent_and_not_saved():
    s = NoiseSchedule.from_name("cosine", num_timesteps=100)
    betas64 = cosine_beta_schedule(100)
    assert s.alphas_cumprod.dtype == torch.float32
    assert torch.allclose(s.alphas_cumprod.double(), torch.cumprod(1 - betas64, 0), rtol=1e-6)
    assert s.state_dict() == {}
    assert s.double().betas.dtype == torch.float64  # buffers move/cast with the module


def test_q_sample_moments_over_large_batch():
    s = NoiseSchedule.from_name("linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    n, t_val, c = 200_000, 300, 0.7
    x0 = torch.full((n, 1, 1, 1), c)
    t = torch.full((n,), t_val, dtype=torch.long)
    x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = s.alphas_cumprod[t_val].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * c, abs=5e-3)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - abar), rel=1e-2)


def test_posterior_mean_equals_reference_eps_formula():
    """mu~(x_t, x0(eps)) equals the reference 1/sqrt(a_t) (x_t - b_t/sqrt(1-abar_t) eps)."""
    s = NoiseSchedule.from_name("cosine", num_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(8, 1, 4, 4, generator=g)
    eps = torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([1, 5, 50, 200, 400, 600, 800, 990])
    x0, _ = s.predict_x0_eps(x_t, t, eps, "epsilon")
    mean = s.q_posterior_mean(x0, x_t, t)
    b = s.betas[t].view(-1, 1, 1, 1)
    a = (1 - s.betas[t]).view(-1, 1, 1, 1)
    sqrt_1m_abar = s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    reference = (x_t - b / sqrt_1m_abar * eps) / a.sqrt()
    assert torch.allclose(mean, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_type_conversions_round_trip(prediction_type):
    s = NoiseSchedule.from_name("linear", num_timesteps=1000).double()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = s.q_sample(x0, t, eps)
    target = s.target(x0, eps, t, prediction_type)
    x0_hat, eps_hat = s.predict_x0_eps(x_t, t, target, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    assert torch.allclose(eps_hat, eps, atol=1e-4)


def test_snr_of_ho_et_al_linear_schedule_from_first_principles():
    """Ho et al. 2020 (Sec. 4): beta_t linear from 1e-4 to 0.02 over T = 1000, so
    alpha_bar_t = prod_{s<=t} (1 - beta_s) and SNR = alpha_bar / (1 - alpha_bar)
    (Kingma et al. 2021, Eq. 2), computed here in plain Python from the paper's numbers."""
    s = NoiseSchedule.from_name("linear", num_timesteps=1000)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    alpha_bar = list(itertools.accumulate((1 - b for b in betas), operator.mul))
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    expected = torch.tensor([alpha_bar[i] / (1 - alpha_bar[i]) for i in t.tolist()])
    assert torch.allclose(s.snr(t).double(), expected.double(), rtol=1e-4)
    assert s.snr(torch.tensor([0])).item() == pytest.approx(9999.0, rel=1e-4)  # 1/beta_1 - 1
    assert math.sqrt(alpha_bar[-1]) == pytest.approx(0.00635, abs=5e-5)  # x_T is ~noise
    # lambda = log(alpha / sigma) = log(SNR) / 2 (Lu et al. 2022, Sec. 2)
    assert torch.allclose(s.log_snr()[t].double(), 0.5 * expected.log().double(), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "quadratic"}, "schedule.name='quadratic' is unknown"),
        ({"name": "linear", "num_timesteps": 0}, "schedule.num_timesteps=0 must be"),
        ({"name": "cosine", "num_timesteps": -5}, "schedule.num_timesteps=-5 must be"),
        ({"name": "linear", "num_timesteps": 20}, "num_timesteps=20 is too small for the linear"),
    ],
)
def test_from_name_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NoiseSchedule.from_name(**kwargs)


def test_scaled_linear_is_linear_in_sqrt_beta():
    s = NoiseSchedule.from_name("scaled_linear")
    roots = s.betas.double().sqrt()
    assert roots[0].item() == pytest.approx(0.00085**0.5, rel=1e-5)
    assert roots[-1].item() == pytest.approx(0.012**0.5, rel=1e-5)
    assert torch.allclose(roots.diff(), roots.diff()[:1].expand(999), atol=1e-7)


def test_sigmoid_schedule_closed_form():
    """Chen 2023, Algorithm 1 with start=-3, end=3, tau=1."""
    T = 1000
    s = NoiseSchedule.from_name("sigmoid", num_timesteps=T)

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    for t in (0, 100, 499, 900):
        u = (t + 1) / T
        expected = (sig(3) - sig(u * 6 - 3)) / (sig(3) - sig(-3))
        assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_rescale(name):
    """Lin et al. 2023, Algorithm 1: sqrt(abar) keeps its first value, ends at exactly 0
    and stays an affine map of the original."""
    plain = NoiseSchedule.from_name(name)
    zero = NoiseSchedule.from_name(name, zero_terminal_snr=True)
    assert zero.zero_terminal_snr and not plain.zero_terminal_snr
    assert zero.alphas_cumprod[-1].item() == 0.0 and zero.betas[-1].item() == 1.0
    assert zero.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    a, b = plain.sqrt_alphas_cumprod.double(), zero.sqrt_alphas_cumprod.double()
    expected = (a - a[-1]) * a[0] / (a[0] - a[-1])
    assert torch.allclose(b, expected, atol=1e-6)
    assert torch.isinf(zero.log_snr()[-1]) and torch.isfinite(zero.log_snr()[:-1]).all()


def test_eps_from_x0_inverts_q_sample():
    s = NoiseSchedule.from_name("cosine")
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 5, 1, 3, 3, generator=g)
    t = torch.tensor([0, 100, 500, 900, 999])
    assert torch.allclose(s.eps_from_x0(s.q_sample(x0, t, noise), t, x0), noise, atol=1e-4)


def test_v_round_trip_at_zero_terminal_snr():
    s = NoiseSchedule.from_name("linear", zero_terminal_snr=True)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 3, 1, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = s.q_sample(x0, t, noise)
    x0_hat, eps_hat = s.predict_x0_eps(x_t, t, s.velocity(x0, noise, t), "v_prediction")
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, noise, atol=1e-5)


def test_schedule_parameters_are_checked():
    with pytest.raises(ValueError, match=r"schedule\.s is not a parameter of the linear"):
        NoiseSchedule.from_name("linear", s=0.008)
    with pytest.raises(ValueError, match=r"schedule\.zero_terminal_snr='yes' must be true"):
        NoiseSchedule.from_name("cosine", zero_terminal_snr="yes")
    assert NoiseSchedule.from_name("linear", beta_end=0.01).betas[-1].item() == pytest.approx(0.01)
