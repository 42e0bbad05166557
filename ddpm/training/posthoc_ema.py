"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Section 3 and Appendix C): the power-function EMA's math, and the
reconstruction of an EMA of any length from the snapshots a ``PowerEMA`` run wrote.

Time ``t`` counts optimizer steps (EMA updates), as ``PowerEMA`` does. An EMA with
exponent gamma averages the weights of steps 0..t with the density
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1), whose std relative to t is sigma_rel.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MAX_SIGMA_REL = 0.3  # sigma_rel(gamma) peaks at ~0.3002 (gamma ~ -0.4); EDM2 uses <= 0.2
SNAPSHOT_NAME = re.compile(r"^step=(\d+)-std=(\d+\.\d+)\.pt$")


def check_sigma_rel(sigma_rel: float, key: str = "ema_std") -> float:
    """``sigma_rel`` as a float, or a one-line ValueError naming ``key`` and the range."""
    try:
        value = float(sigma_rel)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= MAX_SIGMA_REL:
        raise ValueError(
            f"{key}={sigma_rel!r} is not allowed: it must lie in (0, {MAX_SIGMA_REL}] "
            "(the EMA's std relative to the training length; EDM2 uses 0.01-0.2)"
        )
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 Eq. 3: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 Algorithm 2: gamma for ``sigma_rel``, the largest real root of
    gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0 (Eq. 3 multiplied out)."""
    s = check_sigma_rel(sigma_rel, "sigma_rel")
    t = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, step: int) -> float:
    """EDM2 Eq. 2 / Algorithm 1: the EMA decay at optimizer step ``step`` (1-based),
    beta = (1 - 1/t)^(gamma + 1). Step 1 gives 0: the average starts as the weights."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """EDM2 Algorithm 3 (p_dot_p): integral over tau of p_a(tau) p_b(tau) for the power
    profiles ending at t_a and t_b, in closed form. Broadcasts its float64 arguments.

    With m = min(t_a, t_b) the integral is
    (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),
    written as a ratio so that large t do not overflow."""
    ratio = t_a / t_b
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1) * (gamma_b + 1) * ratio**exponent
    return numerator / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


def reconstruction_weights(
    steps: list[int], gammas: list[float], out_step: int, out_gamma: float
) -> Tensor:
    """EDM2 Algorithm 3: the least-squares weights x with sum_i x_i p_i ~ p_out, from
    A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_out>, then divided by their sum (as
    NVlabs/edm2 ``solve_posthoc_coefficients``): an average's weights sum to 1, so weights
    that never moved stay where they are, also for a length outside the tracked ones or
    from a few snapshots, where the bare solution sums to 0.6-0.9. Returns
    [num_snapshots] float64.

    A is scaled to unit diagonal before the solve (the same minimiser, better conditioned:
    the profiles' norms grow like 1/t)."""
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # [N, N]
    out_t = torch.tensor(float(out_step), dtype=torch.float64)
    out_g = torch.tensor(float(out_gamma), dtype=torch.float64)
    b = profile_inner(t, g, out_t, out_g)  # [N]
    scale = a.diagonal().rsqrt()  # [N]
    a_scaled = a * scale[:, None] * scale[None, :]
    x = torch.linalg.lstsq(a_scaled, (b * scale)[:, None], driver="gelsd").solution[:, 0]
    x = x * scale
    return x / x.sum()


def combine(states: list[dict[str, Tensor]], weights: Tensor) -> dict[str, Tensor]:
    """sum_i weights_i states_i per tensor, in float64, cast back to float32."""
    out: dict[str, Tensor] = {}
    for name in states[0]:
        total = torch.zeros_like(states[0][name], dtype=torch.float64)
        for state, w in zip(states, weights.tolist(), strict=True):
            total.add_(state[name].to(torch.float64), alpha=w)
        out[name] = total.to(torch.float32)
    return out


def snapshot_path(folder: Path, step: int, sigma_rel: float) -> Path:
    """``folder/step=0001000-std=0.050.pt``."""
    return folder / f"step={step:07d}-std={sigma_rel:.3f}.pt"


def list_snapshots(folder: Path) -> list[tuple[int, float, Path]]:
    """(step, std, path) of every snapshot file in ``folder``, by step then std."""
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = SNAPSHOT_NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), float(match.group(2)), path))
    return sorted(found)


def reconstruct(folder: Path, max_step: int, sigma_rel: float) -> tuple[dict[str, Tensor], int]:
    """The EMA of length ``sigma_rel`` at the last snapshot step <= ``max_step``,
    reconstructed from all snapshots up to it. Returns (state dict, that step).

    A profile cannot be extended past the last snapshot (the weights after it were never
    seen), so a checkpoint between two snapshots gets the EMA at the earlier one."""
    sigma_rel = check_sigma_rel(sigma_rel)
    snapshots = list_snapshots(folder)
    if not snapshots:
        raise ValueError(
            f"no EMA snapshots in {folder}: ema_std needs a run trained with ema=power"
        )
    usable = [s for s in snapshots if s[0] <= max_step]
    if not usable:
        raise ValueError(
            f"the checkpoint is at step {max_step}, before the first EMA snapshot "
            f"(step {snapshots[0][0]} in {folder}): pick a later checkpoint"
        )
    out_step = usable[-1][0]
    # memory-mapped: the tensors are read as combine() reaches them, not all up front
    records = [
        torch.load(path, map_location="cpu", weights_only=True, mmap=True) for *_, path in usable
    ]
    steps = [int(r["step"]) for r in records]
    gammas = [float(r["gamma"]) for r in records]
    weights = reconstruction_weights(steps, gammas, out_step, sigma_rel_to_gamma(sigma_rel))
    return combine([r["state_dict"] for r in records], weights), out_step
