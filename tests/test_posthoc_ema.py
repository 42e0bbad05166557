"""Post-hoc EMA's math (Karras et al. 2024, EDM2): sigma_rel <-> gamma, the power EMA's
update, the closed-form profile inner products and the least-squares reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.runs.build import steps_per_part
from ddpm.training.posthoc_ema import (
    MAX_SIGMA_REL,
    combine,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner,
    reconstruct,
    reconstruction_weights,
    sigma_rel_to_gamma,
    snapshot_path,
)
from ddpm.training.power_ema import PowerAveragedModel


@pytest.mark.parametrize("sigma_rel", [0.005, 0.01, 0.05, 0.0725, 0.1, 0.2, 0.29, 0.3])
def test_sigma_rel_and_gamma_round_trip(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > -0.5  # the profile t^gamma is integrable and squares are too
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-8)


def test_edm2_values_and_the_relative_std_of_the_profile():
    """EDM2 quotes gamma 16.97 for sigma_rel 0.05 and 6.94 for 0.10; the profile
    p(tau) ~ tau^gamma on [0, 1] has that std (numerically)."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    tau = np.linspace(0, 1, 200_001)
    for gamma in (0.5, 6.94, 16.97):
        p = (gamma + 1) * tau**gamma
        mean = np.trapezoid(tau * p, tau)
        std = math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
        assert std == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31, 1.0, float("nan"), "x"])
def test_sigma_rel_outside_the_range_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"must lie in \(0, 0.3\]") as info:
        sigma_rel_to_gamma(bad)
    assert "\n" not in str(info.value)
    assert MAX_SIGMA_REL == 0.3


def test_power_beta_starts_by_copying_and_approaches_one():
    assert power_beta(6.94, 1) == 0.0
    assert power_beta(6.94, 2) == pytest.approx(0.5**7.94)
    assert 0.999 < power_beta(6.94, 100_000) < 1.0


@pytest.mark.parametrize(
    "t_a,g_a,t_b,g_b",
    [(100, 6.94, 100, 6.94), (50, 16.97, 200, 6.94), (300, 0.5, 120, 2.0), (7, 0.2, 9, 30.0)],
)
def test_profile_inner_products_match_numerical_integration(t_a, g_a, t_b, g_b):
    tau = np.linspace(0, max(t_a, t_b), 400_001)
    p_a = np.where(tau <= t_a, (g_a + 1) * tau**g_a / t_a ** (g_a + 1), 0.0)
    p_b = np.where(tau <= t_b, (g_b + 1) * tau**g_b / t_b ** (g_b + 1), 0.0)
    numeric = np.trapezoid(p_a * p_b, tau)
    d = torch.float64
    closed = profile_inner(
        torch.tensor(t_a, dtype=d), torch.tensor(g_a, dtype=d),
        torch.tensor(t_b, dtype=d), torch.tensor(g_b, dtype=d),
    )  # fmt: skip
    assert closed.item() == pytest.approx(numeric, rel=2e-3)


def _simulate(steps: int, stds: list[float], every: int, dim: int = 64, seed: int = 0):
    """Weights that wander (a random walk with drift) and their power EMAs, by EDM2's
    Algorithm 1; snapshots of each EMA every ``every`` steps: list of (step, gamma, avg)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(dim, dtype=torch.float64)
    drift = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.01
    gammas = [sigma_rel_to_gamma(s) for s in stds]
    avgs = [torch.zeros(dim, dtype=torch.float64) for _ in stds]
    snaps = []
    for t in range(1, steps + 1):
        w = w + drift + 0.05 * torch.randn(dim, generator=gen, dtype=torch.float64)
        for g, avg in zip(gammas, avgs, strict=True):
            beta = power_beta(g, t)
            avg.mul_(beta).add_(w, alpha=1 - beta)
        if t % every == 0:
            snaps += [(t, g, avg.clone()) for g, avg in zip(gammas, avgs, strict=True)]
    return snaps, avgs


def _rebuild(snaps, out_step, out_std):
    usable = [s for s in snaps if s[0] <= out_step]
    x = reconstruction_weights(
        [s[0] for s in usable], [s[1] for s in usable], out_step, sigma_rel_to_gamma(out_std)
    )
    return combine([{"w": s[2]} for s in usable], x)["w"].double()


def test_reconstruction_returns_a_tracked_average_and_rebuilds_an_untracked_one():
    """The EMA a run tracked comes back from the snapshots (1e-3 relative), and one it did
    not track (0.07, between 0.05 and 0.10) is rebuilt close to the EMA a run with that
    std tracks: closer than either tracked neighbour, and to a few % of their distance."""
    snaps, (avg05, avg10) = _simulate(2000, [0.05, 0.10], every=100)
    for avg, std in ((avg05, 0.05), (avg10, 0.10)):
        rebuilt = _rebuild(snaps, 2000, std)
        assert (rebuilt - avg).norm() / avg.norm() < 1e-3
    _, (direct,) = _simulate(2000, [0.07], every=2000)
    rebuilt = _rebuild(snaps, 2000, 0.07)
    error = (rebuilt - direct).norm()
    assert error < 0.05 * min((avg05 - direct).norm(), (avg10 - direct).norm())


@pytest.mark.parametrize(
    ("steps", "out_std"),
    [
        (list(range(100, 1700, 100)), 0.3),  # 16 snapshots, outside the tracked stds
        (list(range(100, 1700, 100)), 0.10),  # 16 snapshots, inside
        ([100, 200], 0.01),  # an early checkpoint: 2 snapshot steps, far outside
        ([100, 200, 300, 400], 0.02),
    ],
)
def test_reconstruction_weights_sum_to_one_and_keep_a_constant(steps, out_std):
    """An average's weights sum to 1 (NVlabs/edm2 phema.py divides the least-squares
    solution by its sum): weights that never moved reconstruct to themselves, at any
    std and from any number of snapshots (tracked stds 0.05 and 0.15)."""
    tracked = [sigma_rel_to_gamma(s) for s in (0.05, 0.15)]
    all_steps = [t for t in steps for _ in tracked]
    gammas = [g for _ in steps for g in tracked]
    x = reconstruction_weights(all_steps, gammas, steps[-1], sigma_rel_to_gamma(out_std))
    assert float(x.sum()) == pytest.approx(1.0, abs=1e-12)
    constant = torch.linspace(-2, 3, 50)
    rebuilt = combine([{"w": constant.clone()} for _ in all_steps], x)["w"]
    assert torch.allclose(rebuilt, constant, atol=1e-6)


def test_the_averaged_model_follows_algorithm_1():
    """PowerAveragedModel's averages (all tracked stds) equal the plain loop above."""
    net = nn.Linear(4, 3)
    model = PowerAveragedModel(net, [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)])
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        history.append(torch.cat([p.detach().flatten() for p in net.parameters()]).double())
        model.update_parameters(net)
    for std, tensors in zip((0.05, 0.1), model.tracked(), strict=True):
        gamma, expect = sigma_rel_to_gamma(std), torch.zeros_like(history[0])
        for t, w in enumerate(history, start=1):
            beta = power_beta(gamma, t)
            expect = beta * expect + (1 - beta) * w
        got = torch.cat([x.flatten() for x in tensors]).double()
        assert torch.allclose(got, expect, atol=1e-5)
    assert model.averaged_names() == ["weight", "bias"]


def test_reconstruct_reads_snapshot_files_and_names_what_is_missing(tmp_path):
    snaps, (avg05, _) = _simulate(400, [0.05, 0.10], every=100)
    with pytest.raises(ValueError, match=r"no EMA snapshots in .*ema=power"):
        reconstruct(tmp_path, 400, 0.05)
    for step, gamma, avg in snaps:
        std = 0.05 if gamma > 10 else 0.10
        record = {"step": step, "std": std, "gamma": gamma, "state_dict": {"w": avg.float()}}
        torch.save(record, snapshot_path(tmp_path, step, std))
    state, step = reconstruct(tmp_path, 400, 0.05)
    assert step == 400 and (state["w"].double() - avg05).norm() / avg05.norm() < 1e-3
    state, step = reconstruct(tmp_path, 350, 0.05)  # between snapshots: the earlier one
    assert step == 300
    with pytest.raises(ValueError, match=r"at step 50, before the first EMA snapshot \(step 100"):
        reconstruct(tmp_path, 50, 0.05)
    with pytest.raises(ValueError, match=r"ema_std=0\.5 is not allowed"):
        reconstruct(tmp_path, 400, 0.5)


def test_snapshot_every_resolver():
    assert steps_per_part(1500, 16) == 94
    assert steps_per_part(800_000, 16) == 50_000
    assert steps_per_part(5, 16) == 1
    assert steps_per_part(-1, 16) == 1000
