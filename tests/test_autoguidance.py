"""Autoguidance (ddpm.diffusion.guidance.AutoGuided, ddpm.runs.guide): the guided denoiser
against D0 + w (D1 - D0) on analytic models in every sampler, w = 1 bit for bit, a guide
from snapshots against the EMA rebuilt at its step, the refusals, and train.py then
sample.py guide_step=... as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ddpm.diffusion.flow import FlowLoss
from ddpm.diffusion.guidance import AutoGuided
from ddpm.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EDMSampler,
    FlowSampler,
)
from ddpm.diffusion.schedules import NoiseSchedule
from ddpm.runs.build import build_module, load_module
from ddpm.runs.errors import UsageError
from ddpm.runs.guide import check_guide, load_guide
from ddpm.training.posthoc_ema import list_snapshots, reconstruct
from tests.conftest import TINY, call_entry, compose_train, draw_from


def strong(x, t, **conditioning):
    """An analytic 'main model': affine in x, depends on t and the label."""
    y = conditioning.get("y")
    shift = 0.0 if y is None else y.float().view(-1, 1, 1, 1) * 0.01
    return 0.9 * x + 0.001 * t.float().view(-1, 1, 1, 1) + shift


def weak(x, t, **conditioning):
    """An analytic 'guide': another affine map of the same inputs."""
    y = conditioning.get("y")
    shift = 0.0 if y is None else y.float().view(-1, 1, 1, 1) * 0.02
    return 0.5 * x - 0.002 * t.float().view(-1, 1, 1, 1) - shift


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0, 3.0])
@pytest.mark.parametrize("labels", [None, torch.tensor([0, 3])])
def test_the_guided_output_is_d0_plus_w_times_d1_minus_d0(weight, labels):
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([10.0, 500.0])
    kwargs = {} if labels is None else {"y": labels}
    d1, d0 = strong(x, t, **kwargs), weak(x, t, **kwargs)
    guided = AutoGuided(strong, weak, weight)(x, t, **kwargs)
    torch.testing.assert_close(guided, d0 + weight * (d1 - d0), rtol=0, atol=1e-6)


def test_weight_one_returns_the_main_output_without_calling_the_guide():
    calls = []

    def guide(x, t, **conditioning):
        calls.append(1)
        return weak(x, t)

    x, t = torch.randn(3, 1, 4, 4), torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(AutoGuided(strong, guide, 1.0)(x, t), strong(x, t))
    assert calls == []


def test_the_samplers_read_the_main_models_attributes_through_the_wrapper():
    class Main:
        sigma_min, sigma_max = 0.01, 5.0

        def round_sigma(self, sigma, lo=0.0, hi=float("inf")):
            return sigma

        def __call__(self, x, t, **conditioning):
            return strong(x, t)

    guided = AutoGuided(Main(), weak, 2.0)
    assert (guided.sigma_min, guided.sigma_max) == (0.01, 5.0)
    assert callable(guided.round_sigma)


SAMPLERS = [
    (DDPMSampler(steps=5), "epsilon", dict(name="cosine", num_timesteps=100)),
    (DDIMSampler(steps=5), "v_prediction", dict(name="cosine", num_timesteps=100)),
    (DPMSolverSampler(steps=5), "epsilon", dict(name="cosine", num_timesteps=100)),
    (EDMSampler(steps=4), "sample", dict(name="edm", num_timesteps=100)),
    (FlowSampler(steps=4), "sample", None),
]


@pytest.mark.parametrize("sampler, prediction, grid", SAMPLERS, ids=lambda v: type(v).__name__)
def test_every_sampler_draws_the_combined_denoiser_and_w1_is_the_unguided_draw(
    sampler, prediction, grid
):
    schedule = NoiseSchedule.from_name(**(grid or dict(name="edm", num_timesteps=100)))
    if isinstance(sampler, FlowSampler):  # a flow sampler needs a FlowModel (its velocity)
        flow = FlowLoss()
        wrap = lambda f: flow.sampling_model(f, schedule)  # noqa: E731
    else:
        wrap = lambda f: f  # noqa: E731
    labels = torch.tensor([1, 2])

    def combined(x, t, **kw):  # D0 + 2.5 (D1 - D0), written out
        return weak(x, t, **kw) + 2.5 * (strong(x, t, **kw) - weak(x, t, **kw))

    def draw(model):
        g = torch.Generator().manual_seed(0)
        return sampler.sample(
            model, schedule, (2, 1, 4, 4), prediction_type=prediction, generator=g, y=labels
        )

    guided = draw(AutoGuided(wrap(strong), wrap(weak), 2.5))
    torch.testing.assert_close(guided, draw(wrap(combined)), rtol=1e-5, atol=1e-5)
    assert torch.equal(draw(AutoGuided(wrap(strong), wrap(weak), 1.0)), draw(wrap(strong)))


def _module(*overrides: str):
    return build_module(compose_train([*TINY, *overrides], Path("unused-run-dir")))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.image_size=16"], "shape"),
        (["+model.num_classes=10"], "classes"),
        (["objective=ddpm"], "objective"),
        (["objective.preconditioning.sigma_data=0.5"], "preconditioning"),
        (["schedule.num_timesteps=30"], "noise schedule"),
    ],
)
def test_a_guide_of_another_task_is_refused_in_one_line(overrides, message):
    main = _module()
    with pytest.raises(UsageError, match=message) as refused:
        check_guide(main, _module(*overrides), Path("guide.ckpt"))
    assert "\n" not in str(refused.value)


def test_a_smaller_shorter_guide_of_the_same_task_is_accepted():
    main = _module()
    check_guide(
        main, _module("model.base_channels=4", "objective.preconditioning.p_mean=-1.2"), Path("g")
    )


def test_a_guide_from_snapshots_is_the_ema_rebuilt_at_that_step(tiny_run: Path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    main = load_module(ckpt)
    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "guide_step": 3, "guide_ema_std": 0.05})
    guide, record = load_guide(cfg, main)
    assert (record["step"], record["guide_step"], record["guide_ema_std"]) == (3, 3, 0.05)
    rebuilt, step = reconstruct(tiny_run / "ema_snapshots", 3, 0.05)
    assert step == 3
    state = guide.state_dict()
    for name, tensor in rebuilt.items():
        assert torch.equal(state[name], tensor.to(state[name].dtype)), name
    # 0.05 is one of the lengths the run tracked: the rebuilt EMA is that snapshot
    (snapshot,) = [
        p for s, std, p in list_snapshots(tiny_run / "ema_snapshots") if s == 3 and std == 0.05
    ]
    tracked = torch.load(snapshot, weights_only=True)["state_dict"]
    for name, tensor in tracked.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5)
    # the main model keeps its own weights
    assert not all(torch.equal(main.state_dict()[k], state[k]) for k in rebuilt)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"guide_weight": 2.0}, "need a guide"),
        ({"guide_ema_std": 0.1}, "need a guide"),
        ({"guide_step": 99}, "guide_step=99 is not allowed"),
        ({"guide_step": 0}, "guide_step=0 is not allowed"),
        ({"guide_step": 2, "guide_weight": -1}, "guide_weight=-1 is not allowed"),
        ({"guide_step": 2, "guide_ema_std": 0.5}, "guide_ema_std=0.5 is not allowed"),
        ({"guide_ckpt": "missing.ckpt"}, "is not a file"),
    ],
)
def test_bad_guide_values_are_refused(tiny_run: Path, values, message):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    main = load_module(ckpt)
    with pytest.raises(UsageError, match=message):
        load_guide(OmegaConf.create({"ckpt_path": str(ckpt), **values}), main)


def test_train_then_sample_guided_by_an_earlier_step(tiny_run: Path, tmp_path: Path):
    """The default config's run (EMA, grids on), then sample.py as a user runs it."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    plain, _ = draw_from(ckpt, tmp_path / "plain", cwd=tmp_path)
    same, _ = draw_from(ckpt, tmp_path / "w1", "guide_step=2", cwd=tmp_path)
    assert np.array_equal(same, plain)  # w = 1: the unguided draw, bit for bit
    guided, _ = draw_from(
        ckpt, tmp_path / "w2", "guide_step=2", "guide_ema_std=0.05", "guide_weight=2", cwd=tmp_path
    )
    assert not np.array_equal(guided, plain)
    info = json.loads((tmp_path / "w2" / "samples.json").read_text())
    assert info["guide"]["step"] == 2 and info["guide"]["weight"] == 2.0
    assert info["nfe"] == 2 * json.loads((tmp_path / "plain" / "samples.json").read_text())["nfe"]
    refused = call_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        f"out_dir={tmp_path / 'bad'}",
        "guide_weight=2",
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "need a guide" in refused.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was written
