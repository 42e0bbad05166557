"""Which timesteps a sampler evaluates the network at, and what it does with the x_0
estimate (clipping, dynamic thresholding). Shared by every sampler."""

from __future__ import annotations

import torch
from torch import Tensor

SPACINGS = ("linspace", "leading", "trailing", "logsnr")


def spaced_timesteps(
    num_timesteps: int,
    steps: int | None,
    spacing: str = "linspace",
    log_snr: Tensor | None = None,
) -> list[int]:
    """``steps`` distinct timesteps in [0, num_timesteps - 1], descending, the first T-1.

    The chain evaluates the network at each of them and jumps from the last one to the
    clean sample. ``None``, or ``steps >= num_timesteps``, keeps every timestep. Every
    spacing starts at T-1: the chain starts from pure noise, which only x_{T-1} is (a
    grid starting lower treats noise as a less noisy image; with ``steps=1`` at t = 0, as
    a clean one). The spacings follow Lin et al. 2023 (Table 2) and Lu et al. 2022:

    - ``linspace``: round(linspace(T-1, 0, steps)); starts at T-1 and ends at 0 (one
      step: T-1).
    - ``leading``: k * floor(T / steps) for k < steps (Song et al. 2021's uniform
      skipping), its top point raised to T-1: Table 2's grid starts at T - T / steps,
      the mismatch Lin et al. (Sec. 3.3) point out.
    - ``trailing``: round(T - k T / steps) - 1; starts at T-1, its last step jumps from
      about T / steps to the clean sample.
    - ``logsnr``: uniform in lambda = log(alpha / sigma) over steps + 1 points from
      lambda(T-1) to lambda(0), the last dropped (Lu et al. 2022, Sec. 3.3); needs
      ``log_snr`` (the schedule's lambda for t = 0 .. num_timesteps - 1 at least). With
      zero terminal SNR the grid spans the finite lambdas and still starts at T-1.

    Rounding can merge neighbours; the duplicates are dropped, so a chain may be a step
    shorter than asked for (``logsnr`` with ``steps`` near T only).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} is unknown; choose one of {list(SPACINGS)}")
    if steps is None or steps >= num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if steps < 1:
        raise ValueError(f"sampler.steps={steps} must be >= 1, or null for all timesteps")
    T = num_timesteps
    if spacing == "linspace":
        grid = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round()
    elif spacing == "leading":
        grid = torch.arange(steps, dtype=torch.float64).flip(0) * (T // steps)
        grid[0] = T - 1
    elif spacing == "trailing":
        grid = (torch.arange(T, 0, -T / steps, dtype=torch.float64)[:steps]).round() - 1
    else:
        if log_snr is None:
            raise ValueError("sampler.spacing=logsnr needs the schedule's log-SNR")
        lam = log_snr[:T].double().flip(0)  # increasing in index: lam[i] = lambda(T-1-i)
        # with zero terminal SNR lambda(T-1) = -inf: space from the lowest finite lambda
        low = lam[torch.isfinite(lam)].min().item()
        targets = torch.linspace(low, lam[-1].item(), steps + 1, dtype=torch.float64)[:-1]
        # for each target lambda, the timestep whose lambda is nearest (lambda is monotone)
        pos = torch.searchsorted(lam.contiguous(), targets.contiguous()).clamp(max=T - 1)
        below = (pos - 1).clamp(min=0)
        nearer_below = (targets - lam[below]).abs() < (lam[pos] - targets).abs()
        grid = (T - 1 - torch.where(nearer_below, below, pos)).double()
        grid[0] = T - 1  # the chain always starts at the top of the range
    return sorted({int(t) for t in grid.long().tolist()}, reverse=True)


def first_timestep(log_snr: Tensor, min_log_snr: float | None) -> int:
    """The largest t whose lambda_t is at least ``min_log_snr`` (T-1 for ``None``).

    An epsilon-predicting network's x_0 estimate (x_t - sigma eps) / alpha multiplies its
    error by sigma / alpha = exp(-lambda): 2e4 at the cosine schedule's t = T-1. Starting
    the chain at lambda >= -5.1 (linear's lambda at T-1) is the fix of Lu et al.'s
    DPM-Solver code (cosine "T = 0.9946"; diffusers' ``lambda_min_clipped``).
    """
    T = log_snr.shape[0]
    if min_log_snr is None:
        return T - 1
    ok = torch.nonzero(log_snr >= min_log_snr).flatten()
    if ok.numel() == 0:
        raise ValueError(
            f"sampler.min_log_snr={min_log_snr} is above every timestep's log-SNR "
            f"(largest: {log_snr.max().item():.2f}); lower it or set it to null"
        )
    return int(ok.max())


def process_x0(x0: Tensor, clip: bool, dynamic_threshold: float | None) -> Tensor:
    """Keep an x_0 estimate in the data range [-1, 1].

    ``dynamic_threshold`` = p: per sample, s = max(1, p-quantile of |x_0|), then x_0 is
    clipped to [-s, s] and divided by s (Saharia et al. 2022, Imagen, Sec. 2.3). It
    replaces the static clip (to which it reduces when s = 1). Otherwise ``clip`` clips
    to [-1, 1] as Ho et al.'s code does.
    """
    if dynamic_threshold is not None:
        flat = x0.flatten(1).abs().float()  # [B, C*H*W]
        s = torch.quantile(flat, dynamic_threshold, dim=1).clamp(min=1.0)
        s = s.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # [B, 1, 1, 1]
        return x0.clamp(-s, s) / s
    return x0.clamp(-1.0, 1.0) if clip else x0
