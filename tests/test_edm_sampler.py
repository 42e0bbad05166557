"""EDMSampler (Karras et al. 2022, Algorithm 2) fed exact denoisers: of a Gaussian and of a
mixture of two Gaussians, through every schedule and prediction type, and through an
EDM-preconditioned net; DDIM and DPM-Solver++ sample that net too."""

import math

import pytest
import torch
from torch import Tensor

from ddpm import EDMSampler, UNet
from ddpm.diffusion.preconditioning import (
    EDMPrecond,
    IDDPMPrecond,
    PreconditionedModel,
    VEPrecond,
)
from ddpm.diffusion.rng import sample_generators
from ddpm.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from ddpm.diffusion.schedules import NoiseSchedule, karras_sigmas

GAUSSIAN = [(1.0, 0.3, 0.5)]  # (weight, mean, std) of each component
MIXTURE = [(0.5, -0.5, 0.12), (0.5, 0.4, 0.2)]


def posterior_mean(x: torch.Tensor, sigma: torch.Tensor, components) -> torch.Tensor:
    """E[x_0 | x] for x = x_0 + sigma n, x_0 ~ sum_k w_k N(m_k, s_k^2) per pixel (float64)."""
    x, sigma = x.double(), sigma.double()
    log_w, means = [], []
    for w, m, s in components:
        var = s**2 + sigma**2
        log_w.append(math.log(w) - 0.5 * (x - m) ** 2 / var - 0.5 * var.log())
        means.append(m + s**2 * (x - m) / var)
    post = torch.softmax(torch.stack(log_w), dim=0)
    return (post * torch.stack(means)).sum(0)


def exact_model(schedule: NoiseSchedule, components, prediction_type: str):
    """model(x_t, t) -> the exact prediction, at integer or fractional t (sigma_at(t))."""

    def model(x_t, t):
        sigma = schedule.sigma_at(t).double().view(-1, *[1] * (x_t.ndim - 1))
        alpha = 1 / (1 + sigma**2).sqrt()
        x0 = posterior_mean(x_t.double() / alpha, sigma, components)
        eps = (x_t.double() - alpha * x0) / (sigma * alpha)
        v = alpha * eps - sigma * alpha * x0
        return {"epsilon": eps, "sample": x0, "v_prediction": v}[prediction_type].float()

    return model


def moments(components) -> tuple[float, float]:
    mean = sum(w * m for w, m, _ in components)
    second = sum(w * (s**2 + m**2) for w, m, s in components)
    return mean, math.sqrt(second - mean**2)


@pytest.mark.parametrize("data", ["gaussian", "mixture"])
@pytest.mark.parametrize("schedule_name", ["cosine", "linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_edm_sampler_recovers_the_data_at_18_steps(data, schedule_name, prediction_type):
    """Its defaults (18 Heun steps = 35 NFE, rho = 7, sigma in [0.002, 80] clamped to the
    schedule's range) on an exact discrete-schedule denoiser. Measured (4,000 samples):
    mean error <= 0.006, std +4.2% (Gaussian) and +3.1% (mixture); DPM-Solver++(2M) ODE,
    logsnr spacing, 35 steps: +0.3% and +0.4% (docs/edm.md)."""
    components = GAUSSIAN if data == "gaussian" else MIXTURE
    schedule = NoiseSchedule.from_name(schedule_name)
    sampler = EDMSampler()
    assert sampler.nfe(schedule, prediction_type) == 35
    out = sampler.sample(
        exact_model(schedule, components, prediction_type),
        schedule,
        (4000, 1, 1, 1),
        prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(0),
    )
    mean, std = moments(components)
    assert out.mean().item() == pytest.approx(mean, abs=0.03)
    assert out.std().item() == pytest.approx(std, rel=0.10)
    if data == "mixture":  # both modes, in their proportions
        assert (out < -0.05).float().mean().item() == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize(
    "sampler",
    [
        EDMSampler(),
        # churn at its cap (gamma = sqrt(2) - 1) needs more steps: at 18, std +14%; 40: +4%
        EDMSampler(steps=40, s_churn=40, sigma_to_t="nearest"),
        DDIMSampler(steps=50, clip_denoised=False),
        DPMSolverSampler(steps=20, solver="ode", spacing="logsnr", clip_denoised=False),
        DDPMSampler(steps=250, clip_denoised=False),
    ],
    ids=["edm", "edm-churn-nearest", "ddim", "dpm_solver", "ddpm"],
)
def test_an_edm_preconditioned_net_samples_with_every_sampler(sampler):
    """F chosen so that D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) is the exact
    Gaussian denoiser; the samplers see it as PreconditionedModel on the edm grid."""
    precond = EDMPrecond(sigma_data=0.5)
    schedule = NoiseSchedule.from_name("edm", num_timesteps=1000)

    def net(x_in, c_noise):
        sigma = (4 * c_noise).exp()  # c_noise = ln(sigma) / 4
        c_skip, c_out, c_in, _ = precond.coefficients(sigma)
        x = x_in / c_in
        return ((posterior_mean(x, sigma.view(-1, 1, 1, 1), GAUSSIAN) - c_skip * x) / c_out).float()

    out = sampler.sample(
        PreconditionedModel(net, precond, schedule),
        schedule,
        (4000, 1, 1, 1),
        prediction_type="sample",
        generator=torch.Generator().manual_seed(1),
    )
    mean, std = moments(GAUSSIAN)
    assert out.mean().item() == pytest.approx(mean, abs=0.03)
    assert out.std().item() == pytest.approx(std, rel=0.10)


def test_noise_levels_are_eq_5_within_the_schedules_range():
    sigmas = EDMSampler(steps=18).sigmas(NoiseSchedule.from_name("edm"))
    rho = 7.0
    expected = [
        (80 ** (1 / rho) + i / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
        for i in range(18)
    ]
    assert sigmas[:-1] == pytest.approx(expected, rel=1e-5) and sigmas[-1] == 0.0
    linear = NoiseSchedule.from_name("linear")  # sigma in [0.0100, 157.4]
    clamped = EDMSampler(steps=5, sigma_max=500.0).sigmas(linear)
    low, high = linear.sigma_range()
    assert clamped[0] == pytest.approx(high) and clamped[-2] == pytest.approx(low)
    # nearest: every level is one of the grid's sigmas
    grid = linear.log_sigmas.double().exp()
    for sigma in EDMSampler(sigma_to_t="nearest").sigmas(linear)[:-1]:
        assert (grid - sigma).abs().min().item() < 1e-9 * max(sigma, 1)
    assert karras_sigmas(1, 0.002, 80, 7).tolist() == pytest.approx([80.0])


def test_churn_draws_from_each_samples_generator():
    """With churn the chain adds fresh noise each step, from the per-sample generators: the
    same (seed, index) gives the same image whatever the batch, and churn changes it."""
    schedule = NoiseSchedule.from_name("cosine", num_timesteps=200)
    model = exact_model(schedule, GAUSSIAN, "epsilon")
    churn = EDMSampler(steps=6, s_churn=40)
    whole = churn.sample(model, schedule, (6, 1, 2, 2), generator=sample_generators(7, range(6)))
    part = churn.sample(model, schedule, (2, 1, 2, 2), generator=sample_generators(7, [4, 5]))
    assert torch.equal(whole[4:], part)
    plain = EDMSampler(steps=6).sample(
        model, schedule, (2, 1, 2, 2), generator=sample_generators(7, [4, 5])
    )
    assert not torch.allclose(plain, part)
    seen = []
    hook = lambda t, x, x0: seen.append(t)  # noqa: E731
    EDMSampler(steps=6).sample(model, schedule, (1, 1, 2, 2), on_step=hook)
    assert len(seen) == 11 and seen == sorted(seen, reverse=True)  # 2N - 1 evaluations


def test_bad_edm_sampler_values_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"sampler\.sigma_min=80 and sampler\.sigma_max=1"):
        EDMSampler(sigma_min=80, sigma_max=1)
    with pytest.raises(ValueError, match=r"sampler\.rho=0 must be > 0"):
        EDMSampler(rho=0)
    with pytest.raises(ValueError, match=r"sampler\.s_churn=-1"):
        EDMSampler(s_churn=-1)
    with pytest.raises(ValueError, match=r"sampler\.solver='rk4' is unknown"):
        EDMSampler(solver="rk4")
    with pytest.raises(ValueError, match=r"sampler\.sigma_to_t='round' is unknown"):
        EDMSampler(sigma_to_t="round")
    with pytest.raises(ValueError, match=r"sampler\.steps=null is not allowed for edm"):
        EDMSampler(steps=None)
    with pytest.raises(ValueError, match=r"leave nothing of the schedule's sigma range"):
        EDMSampler(sigma_min=200, sigma_max=300).sigmas(NoiseSchedule.from_name("edm"))


class _Recorder(torch.nn.Module):
    """A network F that records what it is called with (its input and c_noise) and
    returns zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, c_noise: Tensor, **_: object) -> Tensor:
        self.calls.append((x.clone(), c_noise.clone()))
        return torch.zeros_like(x)


def test_churn_evaluates_the_net_at_the_sigma_the_step_uses():
    """s_churn=10 over 5 steps: sigma^ = 80 (1 + 0.41) = 113 lies above the grid's 80, where
    the net can only be told 80. sigma^ is clamped to the grid before the churn noise, as
    EDM's round_sigma clamps a discrete net's (so the first step adds none), and the net's
    input is c_in(sigma) x of the chain's own x at the sigma in its c_noise."""
    schedule = NoiseSchedule.from_name("edm", num_timesteps=100)
    precond, net = EDMPrecond(sigma_data=0.5), _Recorder()
    model = PreconditionedModel(net, precond, schedule)
    latent = torch.ones(1, 1, 2, 2)
    EDMSampler(steps=5, s_churn=10, solver="euler").sample(
        model, schedule, latent.shape, prediction_type="sample", x_T=latent
    )
    x, c_noise = net.calls[0]
    sigma = (4 * c_noise).exp().double()  # c_noise = ln(sigma) / 4
    assert sigma.item() == pytest.approx(80.0, rel=1e-5)
    expected = 80.0 / math.sqrt(80.0**2 + 0.5**2)  # c_in(80) times x = 80 x_T
    assert torch.allclose(x.double(), torch.full_like(x.double(), expected), rtol=1e-5)


class _RecordingIDDPM(IDDPMPrecond):
    """iDDPM preconditioning that records every sigma its coefficients are taken at."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def coefficients(self, sigma: Tensor):
        self.seen.append(sigma.detach().clone())
        return super().coefficients(sigma)


def test_the_sampler_keeps_to_the_preconditionings_range_and_grid():
    """As NVlabs' sampler clamps to net.sigma_min/max and applies round_sigma: edm_ve's net
    (trained on [0.02, 100]) is not sampled below 0.02, and edm_iddpm's is evaluated on
    its own noise levels u_j, so c_in and c_out use the sigma whose index is c_noise."""
    schedule = NoiseSchedule.from_name("edm")
    ve = PreconditionedModel(_Recorder(), VEPrecond(), schedule)
    sigmas = EDMSampler(steps=18).sigmas(schedule, ve)
    assert min(sigmas[:-1]) == pytest.approx(0.02) and max(sigmas) == pytest.approx(80.0)
    precond = _RecordingIDDPM()
    model = PreconditionedModel(_Recorder(), precond, schedule)
    u = precond._u.double()
    for sigma in EDMSampler(steps=18).sigmas(schedule, model)[:-1]:
        assert (u - sigma).abs().min().item() <= 1e-6 * sigma  # on the u grid
    EDMSampler(steps=6, s_churn=5).sample(model, schedule, (1, 1, 2, 2), prediction_type="sample")
    assert len(precond.seen) == 11
    for sigma in torch.cat(precond.seen).double():
        index = (u - sigma).abs().argmin()
        assert (sigma - u[index]).abs().item() <= 1e-5 * sigma.item(), sigma


def test_the_default_edm_sampler_calls_a_discrete_schedule_net_with_fractional_float_t():
    """The public call contract: ``model(x_t, t)`` takes t as a LongTensor of timesteps,
    or, from EDMSampler with sigma_to_t=interpolate (the default), as a float tensor of
    fractional timesteps, which the UNet's sinusoidal embedding takes as it is;
    sigma_to_t=nearest passes integers."""
    schedule = NoiseSchedule.from_name("cosine", num_timesteps=100)
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=())  # fmt: skip
    for sigma_to_t, fractional in (("interpolate", True), ("nearest", False)):
        seen: list[Tensor] = []

        def model(x_t: Tensor, t: Tensor, seen=seen) -> Tensor:
            seen.append(t)
            return net(x_t, t)

        out = EDMSampler(steps=4, sigma_to_t=sigma_to_t).sample(model, schedule, (2, 1, 8, 8))
        assert torch.isfinite(out).all() and len(seen) == 7
        assert all(t.is_floating_point() is fractional for t in seen)
        assert any((t != t.round()).any() for t in seen) is fractional
        if fractional:  # the net's output at t = 36.4 lies between those at 36 and 37
            x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                lo, mid, hi = (net(x, torch.tensor([v])) for v in (36.0, 36.4, 37.0))
            assert not torch.equal(mid, lo) and not torch.equal(mid, hi)
