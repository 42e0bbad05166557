import pytest
import torch

from ddpm.diffusion.schedules import NoiseSchedule
from ddpm.diffusion.timesteps import first_timestep, process_x0, spaced_timesteps


def test_linspace_spacing():
    assert spaced_timesteps(10, None) == list(range(9, -1, -1))
    steps = spaced_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0
    assert steps == sorted(steps, reverse=True)
    assert spaced_timesteps(100, 250) == list(range(99, -1, -1))  # capped at T
    with pytest.raises(ValueError, match=r"sampler\.steps=0 must be >= 1"):
        spaced_timesteps(1000, 0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 999])
def test_every_spacing_starts_at_the_top(spacing, steps):
    """The chain starts from pure noise, x_{T-1}: one step at t = 0 would treat noise as a
    clean image (linspace and leading did)."""
    lam = NoiseSchedule.from_name("cosine").log_snr()
    grid = spaced_timesteps(1000, steps, spacing, lam)
    assert grid[0] == 999 and grid == sorted(set(grid), reverse=True) and min(grid) >= 0
    if spacing != "logsnr":  # (logsnr may merge neighbours near steps = T)
        assert len(grid) == steps


def test_leading_and_trailing_match_lin_et_al_table_2():
    # Lin et al. 2023, Table 2 (T = 1000, 10 steps); leading's top raised from 900 to T-1
    assert spaced_timesteps(1000, 10, "leading") == [999, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert spaced_timesteps(1000, 10, "trailing") == [
        999,
        899,
        799,
        699,
        599,
        499,
        399,
        299,
        199,
        99,
    ]
    assert spaced_timesteps(1000, 10, "linspace") == [
        999,
        888,
        777,
        666,
        555,
        444,
        333,
        222,
        111,
        0,
    ]


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_logsnr_spacing_is_uniform_in_lambda(zero_terminal_snr):
    schedule = NoiseSchedule.from_name("linear", zero_terminal_snr=zero_terminal_snr)
    lam = schedule.log_snr()
    steps = spaced_timesteps(1000, 10, "logsnr", lam)
    assert len(steps) == 10 and steps[0] == 999
    gaps = lam[steps[1:]].diff() if zero_terminal_snr else lam[steps].diff()
    assert torch.isfinite(gaps).all()
    assert gaps.min() > 0.9 * gaps.max()  # equal lambda steps up to rounding to integers
    with pytest.raises(ValueError, match="needs the schedule's log-SNR"):
        spaced_timesteps(1000, 10, "logsnr")


def test_first_timestep():
    lam = torch.linspace(5.0, -10.0, 1000, dtype=torch.float64)
    assert first_timestep(lam, None) == 999
    t = first_timestep(lam, -5.0)
    assert lam[t] >= -5.0 > lam[t + 1]


def test_dynamic_thresholding_is_imagen_s():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.4, 0.9]]).view(2, 1, 2, 2)
    out = process_x0(x0, clip=True, dynamic_threshold=1.0)
    # sample 0: s = max |x0| = 3 -> x0 / 3; sample 1: s = max(0.9, 1) = 1 -> unchanged
    assert torch.allclose(out[0], x0[0] / 3)
    assert torch.allclose(out[1], x0[1])
    assert torch.equal(process_x0(x0, clip=True, dynamic_threshold=None), x0.clamp(-1, 1))
    assert torch.equal(process_x0(x0, clip=False, dynamic_threshold=None), x0)
