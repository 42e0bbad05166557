"""EDM2's learned loss weighting (ddpm.diffusion.weighting, objective.learned_weighting):
the loss and its gradient against the closed form, training and validation modes, and a
train.py run whose checkpoint carries the learned u(sigma)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddpm.diffusion.objectives import EDMLoss
from ddpm.diffusion.preconditioning import EDMPrecond
from ddpm.diffusion.weighting import FourierFeatures, UncertaintyWeighting
from ddpm.runs.build import load_module
from tests.test_resume import WITH_CALLBACKS, _same_state, straight_and_split


def test_fourier_features_are_fixed_and_leave_the_global_random_state_alone():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    a, b = FourierFeatures(16), FourierFeatures(16)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.freqs, b.freqs) and torch.equal(a.phases, b.phases)
    x = torch.tensor([0.0, -1.0, 0.5])
    expected = math.sqrt(2) * torch.cos(x[:, None] * a.freqs + a.phases)
    torch.testing.assert_close(a(x), expected)


def test_u_starts_at_zero_so_training_starts_from_the_fixed_weighting():
    u = UncertaintyWeighting(32)
    assert torch.equal(u(torch.tensor([0.01, 1.0, 50.0])), torch.zeros(3))


@pytest.mark.parametrize("bias, weighted", [(0.0, 2.0), (1.5, 2.0), (-0.7, 0.3), (1.2, 3.3)])
def test_the_loss_and_its_gradient_match_the_closed_form(bias, weighted):
    """L(u) = w e^-u + u: dL/du = 1 - w e^-u, negative below u* = ln w, positive above."""
    module = UncertaintyWeighting(8)
    with torch.no_grad():
        module.linear.bias.fill_(bias)
        module.linear.weight.zero_()
    sigma = torch.tensor([0.3])
    loss = module.loss(sigma, torch.tensor([weighted]))
    torch.testing.assert_close(loss, torch.tensor([weighted * math.exp(-bias) + bias]))
    loss.sum().backward()
    grad = float(module.linear.bias.grad)
    assert grad == pytest.approx(1 - weighted * math.exp(-bias), abs=1e-6)
    assert math.copysign(1, grad) == math.copysign(1, bias - math.log(weighted))


def test_gradient_descent_on_u_reaches_the_log_of_the_weighted_error():
    """For each noise level u converges to u* = ln(lambda E||D - y||^2): here two sigmas
    with constant weighted errors 0.2 and 5 (the features tell the two apart)."""
    torch.manual_seed(0)
    module = UncertaintyWeighting(64)
    sigma = torch.tensor([0.05, 20.0])
    target = torch.tensor([0.2, 5.0])
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        module.loss(sigma, target).sum().backward()
        optimizer.step()
    torch.testing.assert_close(module(sigma), target.log(), rtol=0, atol=0.02)


def test_edm_loss_uses_u_in_training_and_the_fixed_weighting_in_eval():
    pre = EDMPrecond(sigma_data=0.5)
    loss = EDMLoss(pre, learned_weighting=True, weighting_channels=8)
    fixed = EDMLoss(pre)
    with torch.no_grad():
        loss.uncertainty.linear.bias.fill_(0.4)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])

    def net(x, c):
        return 0.1 * x

    plain = fixed(net, None, x0, sigma, noise)
    torch.testing.assert_close(loss(net, None, x0, sigma, noise), plain * math.exp(-0.4) + 0.4)
    loss.uncertainty.eval()
    torch.testing.assert_close(loss(net, None, x0, sigma, noise), plain)


def test_train_py_learns_u_resumes_it_exactly_and_the_checkpoint_carries_it(tmp_path: Path):
    """The default config (EMA, grids, FID on) with objective.learned_weighting=true:
    4 steps straight == 2 steps, then 2 more through resume=RUN_DIR, u(sigma) included."""
    common = [*WITH_CALLBACKS, "logger=csv", "objective.learned_weighting=true",
              "objective.weighting_channels=16", "trainer.val_check_interval=2"]  # fmt: skip
    a, b = straight_and_split(tmp_path, common, 4)
    straight = tmp_path / "straight"
    _same_state(a, b)
    raw = a["current_model_state"]["loss_weighting.linear.weight"]
    assert raw.abs().sum() > 0  # u moved from zero
    module = load_module(straight / "checkpoints" / "last.ckpt")
    assert torch.equal(
        module.loss_weighting.linear.weight, a["state_dict"]["loss_weighting.linear.weight"]
    )
    assert module.loss_weighting is module.objective.uncertainty
