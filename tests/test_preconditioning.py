"""EDM's preconditioning (Karras et al. 2022, Table 1) and its loss, against closed forms."""

import math

import pytest
import torch

from ddpm.diffusion.objectives import DiffusionLoss, EDMLoss
from ddpm.diffusion.preconditioning import (
    EDMPrecond,
    IDDPMPrecond,
    PreconditionedModel,
    VEPrecond,
    VPPrecond,
)
from ddpm.diffusion.schedules import NoiseSchedule, x0_eps_from_output

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.3, 80.0])


def test_edm_coefficients_are_table_1s():
    sd = 0.7
    c_skip, c_out, c_in, c_noise = EDMPrecond(sigma_data=sd).coefficients(SIGMAS)
    for i, s in enumerate(SIGMAS.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-6)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-6)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-6)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, abs=1e-6)
    assert c_skip.shape == (6, 1, 1, 1) and c_noise.shape == (6,)
    # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2: unit weight on F (Eq. 8)
    weight = EDMPrecond(sigma_data=sd).weight(SIGMAS)
    assert torch.allclose(weight * c_out.flatten() ** 2, torch.ones(6), rtol=1e-5)


def test_vp_ve_and_iddpm_coefficients_are_table_1s():
    vp = VPPrecond()
    c_skip, c_out, c_in, c_noise = vp.coefficients(SIGMAS)
    t = torch.tensor([vp.t_of_sigma(torch.tensor(s)).item() for s in SIGMAS.tolist()])
    sigma_back = ((0.5 * 19.9 * t.double() ** 2 + 0.1 * t.double()).exp() - 1).sqrt()
    assert torch.allclose(sigma_back.float(), SIGMAS, rtol=1e-4)  # sigma^-1 inverts sigma(t)
    assert torch.equal(c_skip.flatten(), torch.ones(6))
    assert torch.allclose(c_out.flatten(), -SIGMAS)
    assert torch.allclose(c_in.flatten(), 1 / (SIGMAS**2 + 1).sqrt())
    assert torch.allclose(c_noise, 999 * t, rtol=1e-5)
    assert vp.sigma_min == pytest.approx(0.001, rel=1e-3)  # sigma(1e-5)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-5)

    c_skip, c_out, c_in, c_noise = VEPrecond().coefficients(SIGMAS)
    assert torch.allclose(c_out.flatten(), SIGMAS) and torch.equal(c_in.flatten(), torch.ones(6))
    assert torch.allclose(c_noise, (SIGMAS / 2).log())

    iddpm = IDDPMPrecond()
    # u_j is the cosine schedule's sigma at t = M-1-j (its betas clipped at 0.999 <-> the
    # ratio clipped at C_1 = 0.001): 0.0064 .. 20,291 (EDM's sampler stops at 81)
    cosine = NoiseSchedule.from_name("cosine").log_sigmas.exp()
    assert torch.allclose(iddpm._u.flip(0), cosine, rtol=1e-4)
    assert iddpm.sigma_max == pytest.approx(20291, rel=1e-3)
    u = iddpm._u
    _, c_out, _, c_noise = iddpm.coefficients(u[[0, 500, 999]])
    assert c_noise.tolist() == [999.0, 499.0, 0.0]  # M - 1 - j at sigma = u_j
    assert torch.allclose(c_out.flatten(), -u[[0, 500, 999]])


def test_vp_preconditioning_is_this_projects_epsilon_parameterisation():
    """D = x - sigma F(x / sqrt(1 + sigma^2), c_noise) (VP column) equals the x_0 that an
    epsilon network F gives through the schedule's conversion at x_t = x / sqrt(1 + sigma^2),
    alpha = 1 / sqrt(1 + sigma^2): the same denoiser for the same F."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 3, 3, generator=gen) * 3
    weight = torch.randn(1, 1, 3, 3, generator=gen)

    def eps_net(x_in, c_noise):  # any function of (input, noise label)
        return torch.tanh(x_in * weight + 0.001 * c_noise.view(-1, 1, 1, 1))

    vp = VPPrecond()
    d_vp = vp.denoise(eps_net, x, SIGMAS)
    _, _, _, c_noise = vp.coefficients(SIGMAS)
    alpha = (1 / (1 + SIGMAS**2).sqrt()).view(-1, 1, 1, 1)
    x_t = x * alpha
    x0, _ = x0_eps_from_output(
        x_t, eps_net(x_t, c_noise), alpha, SIGMAS.view(-1, 1, 1, 1) * alpha, "epsilon"
    )
    assert torch.allclose(d_vp, x0, atol=1e-5)


def test_preconditioned_model_is_the_denoiser_at_the_grids_sigma():
    schedule = NoiseSchedule.from_name("edm", num_timesteps=50)
    precond = EDMPrecond()
    net = lambda x, c: x * 0.3 + c.view(-1, 1, 1, 1)  # noqa: E731
    model = PreconditionedModel(net, precond, schedule)
    t = torch.tensor([0.0, 17.0, 17.4, 49.0])
    sigma = schedule.sigma_at(t)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 2
    x_t = x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(model(x_t, t), precond.denoise(net, x, sigma), atol=1e-5)
    # integer t: the grid's own sigma; fractional: log-linear between its neighbours
    assert sigma[1].item() == pytest.approx(math.exp(schedule.log_sigmas[17].item()), rel=1e-6)
    log_between = 0.6 * schedule.log_sigmas[17] + 0.4 * schedule.log_sigmas[18]
    assert sigma[2].log().item() == pytest.approx(log_between.item(), abs=1e-5)
    assert schedule.sigma_range() == pytest.approx((0.002, 80.0), rel=1e-5)


def test_training_sigmas_follow_each_columns_distribution():
    torch.manual_seed(0)
    log_sigma = EDMPrecond(p_mean=-1.2, p_std=1.2).sample_sigma(200_000).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    ve = VEPrecond(sigma_min=0.02, sigma_max=100).sample_sigma(200_000).log()
    assert ve.min().item() >= math.log(0.02) and ve.max().item() <= math.log(100)
    assert ve.mean().item() == pytest.approx((math.log(0.02) + math.log(100)) / 2, abs=0.02)
    iddpm = IDDPMPrecond()
    assert set(iddpm.sample_sigma(5000).tolist()) <= set(iddpm._u.tolist())


@pytest.mark.parametrize("precond", [EDMPrecond(), VPPrecond(), VEPrecond(), IDDPMPrecond()])
def test_edm_loss_of_the_exact_denoiser_is_zero_and_weighted_by_lambda(precond):
    """A denoiser that returns y exactly has loss 0; one that is off by delta everywhere
    has loss lambda(sigma) delta^2 per sample (Eq. 2)."""
    loss_fn = EDMLoss(precond)
    schedule = NoiseSchedule.from_name("edm", num_timesteps=10)
    y = torch.rand(5, 1, 4, 4) * 2 - 1
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 50.0])
    noise = torch.randn_like(y)

    def oracle(delta):
        def net(x_in, c_noise):  # F such that D(y + sigma n) = y + delta
            c_skip, c_out, c_in, _ = precond.coefficients(sigma)
            x = x_in / c_in
            return (y + delta - c_skip * x) / c_out

        return net

    exact = loss_fn(oracle(0.0), schedule, y, sigma, noise)
    assert torch.allclose(exact, torch.zeros(5), atol=1e-4)
    off = loss_fn(oracle(0.1), schedule, y, sigma, noise)
    assert torch.allclose(off, precond.weight(sigma) * 0.01, rtol=1e-3)


def test_validation_levels_depend_on_the_index_only():
    loss_fn = EDMLoss(EDMPrecond())
    schedule = NoiseSchedule.from_name("edm", num_timesteps=10)
    s1, n1 = loss_fn.fixed_levels([3, 7, 9], (1, 2, 2), schedule, seed=0)
    s2, n2 = loss_fn.fixed_levels([9, 3], (1, 2, 2), schedule, seed=0)
    assert torch.equal(s1[[2, 0]], s2) and torch.equal(n1[[2, 0]], n2)
    assert s1.dtype == torch.float32 and (s1 > 0).all()
    assert not torch.equal(loss_fn.fixed_levels([3], (1, 2, 2), schedule, seed=1)[0], s1[:1])


def test_loss_chart_buckets_cover_log_sigma_and_timesteps():
    edm = EDMLoss(EDMPrecond(p_mean=-1.2, p_std=1.2))
    schedule = NoiseSchedule.from_name("edm", num_timesteps=100)
    # 10 equal ranges of ln sigma over P_mean +- 3 P_std = [-4.8, 2.4]; beyond: the ends
    sigmas = torch.tensor([1e-4, math.exp(-4.7), math.exp(-1.3), math.exp(2.3), 1e4])
    assert edm.bucket(sigmas, 10, schedule).tolist() == [0, 0, 4, 9, 9]
    labels = edm.bucket_labels(10, schedule)
    assert len(labels) == 10 and labels[0] == f"{math.exp(-4.8):.3g}-{math.exp(-4.08):.3g}"
    ddpm = DiffusionLoss()
    assert ddpm.bucket(torch.tensor([0, 9, 10, 99]), 10, schedule).tolist() == [0, 0, 1, 9]
    assert ddpm.bucket_labels(10, schedule)[1] == "0010-0019"


def test_edm_objective_refuses_an_infinite_sigma_and_bad_values():
    with pytest.raises(ValueError, match=r"schedule\.zero_terminal_snr=true makes its last sigma"):
        EDMLoss(EDMPrecond()).check_schedule(
            NoiseSchedule.from_name("linear", zero_terminal_snr=True)
        )
    with pytest.raises(ValueError, match=r"objective\.preconditioning\.sigma_data=0 must be > 0"):
        EDMPrecond(sigma_data=0)
    with pytest.raises(ValueError, match=r"objective\.preconditioning\.p_std=-1 must be > 0"):
        EDMPrecond(p_std=-1)
    with pytest.raises(ValueError, match=r"needs 0 < sigma_min < sigma_max"):
        VEPrecond(sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match=r"objective\.preconditioning=.* must be one of"):
        EDMLoss("edm")
    with pytest.raises(ValueError, match=r"schedule\.sigma_min=80.* must satisfy 0 < sigma_min"):
        NoiseSchedule.from_name("edm", sigma_min=80, sigma_max=1)
