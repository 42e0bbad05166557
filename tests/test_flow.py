"""Flow matching (ddpm.diffusion.flow, ddpm.diffusion.samplers.flow): the loss against its
closed form, the time distributions, every sampler on a Gaussian mixture's exact velocity
field, the refusals, and train.py then sample.py with objective=flow."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ddpm.diffusion.flow import FlowLoss, FlowModel, shift_time
from ddpm.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EDMSampler,
    FlowSampler,
)
from ddpm.diffusion.schedules import NoiseSchedule
from tests.conftest import TINY, draw_from, train_run

EDM_GRID = dict(name="edm", num_timesteps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0)


def test_the_loss_is_the_velocity_regression_on_the_straight_path():
    loss = FlowLoss(time_sampling="uniform")
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    seen = {}

    def net(x, c):
        seen["x"], seen["c"] = x, c
        return torch.full_like(x, 0.3)

    out = loss(net, None, x0, t, noise)
    col = t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - col) * x0 + col * noise)  # x_t = (1 - t) x0 + t eps
    assert torch.allclose(seen["c"], 1000 * t)  # the net is told 1000 t
    expected = (0.3 - (noise - x0)).pow(2).flatten(1).mean(1)  # v = eps - x0
    assert out.shape == (4,) and torch.allclose(out, expected)


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = FlowLoss(time_sampling="uniform").sample_t(200_000, generator=g)
    assert uniform.min() >= 0 and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.005
    lognorm = FlowLoss(logit_mean=0.5, logit_std=1.5).sample_t(200_000, generator=g)
    logit = torch.log(lognorm / (1 - lognorm))  # Esser et al. 2024, Eq. 19: logit(t) ~ N(m, s^2)
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 1.5) < 0.02
    shifted = FlowLoss(time_sampling="uniform", shift=3.0).sample_t(200_000, generator=g)
    # t' = 3t / (1 + 2t) (Eq. 23): P(t' <= 0.75) = P(t <= 0.5)
    assert abs((shifted <= 0.75).float().mean() - 0.5) < 0.005
    assert shift_time(torch.tensor(0.5), 3.0) == 0.75


# A two-component Gaussian mixture in one dimension (images [B, 1, 1, 1]).
WEIGHTS, MEANS, STDS = (0.3, 0.7), (-0.6, 0.6), (0.15, 0.2)  # apart: x < 0 is the first


def mixture_velocity(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The exact E[eps - x0 | x_t] of the mixture on the straight path, t = c / 1000:
    per component x_t ~ N((1 - t) mu, (1 - t)^2 s^2 + t^2), Cov(x0, x_t) = (1 - t) s^2,
    Cov(eps, x_t) = t."""
    t = (c.double() / 1000).view(-1, 1, 1, 1)
    x = x.double()
    logs, vs = [], []
    for w, mu, s in zip(WEIGHTS, MEANS, STDS, strict=True):
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        logs.append(math.log(w) - 0.5 * var.log() - r**2 / (2 * var))
        vs.append(t * r / var - (mu + (1 - t) * s**2 * r / var))
    resp = torch.softmax(torch.stack(logs), dim=0)
    return (resp * torch.stack(vs)).sum(0).float()


def check_mixture(samples: torch.Tensor, std_tol: float = 0.10) -> None:
    x = samples.flatten()
    assert torch.isfinite(x).all()
    for k, part in enumerate((x[x < 0], x[x >= 0])):
        assert abs(len(part) / len(x) - WEIGHTS[k]) < 0.03
        assert abs(part.mean().item() - MEANS[k]) < 0.03
        assert abs(part.std().item() / STDS[k] - 1) < std_tol


def draw(sampler, n: int = 20_000) -> torch.Tensor:
    schedule = NoiseSchedule.from_name(**EDM_GRID)
    model = FlowLoss().sampling_model(mixture_velocity, schedule)
    g = torch.Generator().manual_seed(0)
    return sampler.sample(model, schedule, (n, 1, 1, 1), "sample", generator=g)


@pytest.mark.parametrize("solver, steps", [("heun", 16), ("euler", 32)])  # 31 and 32 NFE
def test_flow_samplers_reproduce_a_gaussian_mixture_from_its_exact_velocity(solver, steps):
    check_mixture(draw(FlowSampler(steps=steps, solver=solver)))


def test_a_time_shift_keeps_the_ode_exact():
    check_mixture(draw(FlowSampler(steps=32, solver="heun", shift=3.0)))


def test_the_step_hook_sees_every_call_and_changes_nothing():
    """A trajectory hook sees the 2N - 1 Heun evaluations (descending timesteps of the
    grid) and leaves the draw bit for bit as without it."""
    schedule = NoiseSchedule.from_name(**EDM_GRID)
    model = FlowLoss().sampling_model(mixture_velocity, schedule)
    sampler, shape = FlowSampler(steps=5), (100, 1, 1, 1)
    plain = sampler.sample(model, schedule, shape, generator=torch.Generator().manual_seed(0))
    seen = []
    hooked = sampler.sample(
        model, schedule, shape, generator=torch.Generator().manual_seed(0),
        on_step=lambda step, x_t, x0: seen.append(step),
    )  # fmt: skip
    assert torch.equal(plain, hooked)
    assert len(seen) == sampler.nfe(schedule) == 9 and seen[0] == 999
    assert seen == sorted(seen, reverse=True)


@pytest.mark.parametrize(
    "sampler",
    [
        EDMSampler(steps=32, clip_denoised=False),
        DDIMSampler(steps=100, clip_denoised=False),
        DPMSolverSampler(steps=50, clip_denoised=False),
        DDPMSampler(steps=200, clip_denoised=False),
    ],
    ids=["edm", "ddim", "dpm_solver", "ddpm"],
)
def test_every_other_sampler_draws_the_mixture_through_the_ve_conversion(sampler):
    """sigma = t / (1 - t): FlowModel hands each sampler the x_0 estimate at its timesteps
    (at the step counts where each has converged on this mixture: the first-order DDIM
    and the stochastic samplers need more steps than Heun)."""
    check_mixture(draw(sampler))


def test_the_sampling_model_is_the_posterior_mean_at_the_schedules_sigma():
    """FlowModel(x_t, t): x = x_t sqrt(1 + sigma^2) / (1 + sigma) on the path at
    tau = sigma / (1 + sigma), x0 = x - tau v."""
    schedule = NoiseSchedule.from_name(**EDM_GRID)
    model = FlowModel(mixture_velocity, schedule)
    t = torch.full((5,), 700)
    sigma = schedule.sigma_at(t).double()
    x_t = torch.linspace(-1, 1, 5).view(5, 1, 1, 1)
    tau = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
    x = x_t.double() * ((1 + sigma**2).sqrt() / (1 + sigma)).view(-1, 1, 1, 1)
    v = mixture_velocity(x.float(), 1000 * tau.flatten()).double()
    assert torch.allclose(model(x_t, t).double(), x - tau * v, atol=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match=re.escape("objective.time_sampling='beta'")):
        FlowLoss(time_sampling="beta")
    with pytest.raises(ValueError, match=re.escape("objective.logit_std=0")):
        FlowLoss(logit_std=0)
    with pytest.raises(ValueError, match=re.escape("objective.shift=0")):
        FlowLoss(shift=0)
    with pytest.raises(ValueError, match=re.escape("sampler.solver='rk4'")):
        FlowSampler(solver="rk4")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        FlowLoss().check_schedule(NoiseSchedule.from_name("cosine", zero_terminal_snr=True))
    from ddpm.diffusion.objectives import EDMLoss
    from ddpm.diffusion.preconditioning import EDMPrecond

    with pytest.raises(ValueError, match="sampler=flow_heun integrates a flow-matching velocity"):
        FlowSampler().check_objective(EDMLoss(EDMPrecond()))
    with pytest.raises(ValueError, match="train with objective=flow"):
        schedule = NoiseSchedule.from_name(**EDM_GRID)
        FlowSampler().sample(lambda x, t: x, schedule, (1, 1, 1, 1))


def test_train_then_sample_with_objective_flow(tmp_path):
    """objective=flow through train.py with the default callbacks (EMA, grids, val/fid, the
    loss-by-t chart), then sample.py from the checkpoint with its flow_heun sampler, with
    flow_euler at 4 steps and with EDM's Heun sampler."""
    run_dir = tmp_path / "flow"
    tiny = [o for o in TINY if not o.startswith("sampler.")]
    ckpt, config = train_run(
        run_dir, "objective=flow", *tiny, "sampler.steps=3", "logger=csv", cwd=tmp_path
    )
    assert config["objective"]["_target_"] == "ddpm.diffusion.flow.FlowLoss"
    assert config["sampler"]["_target_"] == "ddpm.diffusion.samplers.FlowSampler"
    assert len(list((run_dir / "loss_by_t").glob("step=*.png"))) == 2
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/fid" in metrics and "val_loss_by_t/t0.00-" in metrics
    for name, extra, sampler in (
        ("heun", [], "FlowSampler"),
        ("euler", ["sampler=flow_euler", "sampler.steps=4"], "FlowSampler"),
        ("edm", ["sampler=edm", "sampler.steps=4"], "EDMSampler"),
    ):
        images, used = draw_from(ckpt, tmp_path / name, *extra, cwd=tmp_path)
        assert images.shape == (3, 8, 8, 1) and images.std() > 0
        assert used == sampler
