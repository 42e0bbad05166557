"""The training hot path: no host reads of device values between logging steps, precision
modes, channels-last, torch.compile, and the host-counted EMA."""

from __future__ import annotations

import copy
import csv
import math
import traceback
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import ddpm.runs.prepare as runs
from ddpm.runs.build import build_module, load_module
from ddpm.runs.cli import train
from ddpm.training.ema import HostCountedAveragedModel
from ddpm.training.precision import ClippableMixedPrecision, precision_plugin
from tests.conftest import TINY, compose_train

# Tensor methods that copy a value to the host: on a GPU each one waits for the stream.
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


class DeviceValueReads(TorchFunctionMode):
    """Marks the tensors that would live on the accelerator in a GPU run (the module's
    parameters and buffers, the EMA copy, each training batch, and everything computed
    from them, optimizer states included) and records every host read of one of them,
    with the training step it happened in. CPU runs have no syncs to observe; this sees
    the reads that would be syncs on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None  # global step while a training batch runs, else None
        self.reads: list[tuple[int, str, str]] = []

    @staticmethod
    def mark(tensors: Any) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                t._on_device = True

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = tree_flatten((args, kwargs))[0]
        if any(getattr(t, "_on_device", False) for t in inputs if isinstance(t, torch.Tensor)):
            self.mark(out)
            if func in HOST_READS and self.step is not None:
                where = next(
                    (f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_stack()[:-1])),
                    "?",
                )
                self.reads.append((self.step, func.__name__, where))
        return out


class TrackReads(L.Callback):
    """Feeds the tracker: marks the device-side state and says when a training batch runs."""

    def __init__(self, mode: DeviceValueReads) -> None:
        self.mode = mode

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mode.mark(list(pl_module.parameters()) + list(pl_module.buffers()))
        for cb in trainer.callbacks:
            average = getattr(cb, "_average_model", None)
            if average is not None:
                self.mode.mark(list(average.parameters()) + list(average.buffers()))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, i: int) -> None:
        self.mode.mark(batch)
        self.mode.step = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mode.step = None

    def on_train_batch_end(self, *args: Any) -> None:
        pass  # the step stays set: the callbacks after this one (EMA, guard) are traced too


def test_training_reads_no_device_value_between_logging_steps(tmp_path, monkeypatch):
    """12 steps logging every 4th: train/loss, grad norm, LR and the guard's flags may be
    read on those steps only; the EMA, the optimizer, the loss and the progress bar never."""
    cfg = compose_train(
        [
            *TINY,
            "trainer.max_steps=12",
            "trainer.val_check_interval=6",
            "trainer.log_every_n_steps=4",
            "logger=csv",
            "eval=null",
        ],
        tmp_path / "run",
    )
    mode = DeviceValueReads()
    original = runs.build_callbacks
    monkeypatch.setattr(
        runs, "build_callbacks", lambda *a, **k: [*original(*a, **k), TrackReads(mode)]
    )
    with mode:
        train(cfg)
    assert mode.reads, "the tracker saw no read at all: it is not wired in"
    # Lightning writes logs when (batches stepped + 1) % 4 == 0: global steps 3, 7, 11
    # (0-based, counted before the optimizer step); the guard also reads its flags before
    # each validation and checkpoint, after steps 5 and 11.
    steps = sorted({step for step, _, _ in mode.reads})
    off_cycle = [r for r in mode.reads if r[0] % 4 != 3 and r[0] % 6 != 5]
    assert not off_cycle, f"host reads outside logging steps {steps}: {off_cycle[:5]}"


def _run(tmp_path, name: str, *overrides: str) -> tuple[list[float], dict]:
    """A 2-step CSV-logged run in-process: its per-step train/loss and its last.ckpt."""
    out = tmp_path / name
    cfg = compose_train(
        [
            *TINY,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "logger=csv",
            "eval=null",
            "seed=3",
            *overrides,
        ],
        out,
    )
    train(cfg)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return losses, torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


def test_bf16_mixed_step_on_cpu_is_finite_and_close_to_fp32(tmp_path):
    fp32, ckpt32 = _run(tmp_path, "fp32", "precision=32-true")
    bf16, ckpt16 = _run(tmp_path, "bf16", "precision=bf16-mixed")
    assert len(bf16) == len(fp32) == 2
    assert all(math.isfinite(v) for v in bf16)
    # same weights, batch, noise and timesteps: only bf16 matmuls/convs differ
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)
    for key, value in ckpt16["state_dict"].items():
        assert value.dtype == ckpt32["state_dict"][key].dtype  # weights stay float32
        assert torch.isfinite(value).all(), key


def test_schedule_math_and_loss_stay_float32_under_autocast(tmp_path):
    cfg = compose_train([*TINY], tmp_path)
    module = build_module(cfg)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = torch.randint(0, module.schedule.num_timesteps, (4,))
        x_t = module.schedule.q_sample(x0, t, torch.randn_like(x0))
        out = module.net(x_t, t)
        loss = module.objective(module.net, module.schedule, x0)
    assert out.dtype == torch.bfloat16  # the net does run in bf16
    assert x_t.dtype == loss.dtype == torch.float32


def test_channels_last_trains_and_its_checkpoint_loads_either_way(tmp_path):
    module = build_module(compose_train([*TINY, "channels_last=true"], tmp_path))
    conv = module.net.down[0].res.conv1.weight  # [8, 8, 3, 3]: the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = build_module(compose_train([*TINY], tmp_path))
    plain.load_state_dict(module.state_dict())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9])
    out = module.net.eval()(x, t)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout propagates
    assert torch.allclose(out, plain.net.eval()(x, t), atol=1e-5)

    losses, ckpt = _run(tmp_path, "cl", "channels_last=true")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    loaded = load_module(tmp_path / "cl" / "checkpoints" / "last.ckpt")
    assert loaded.channels_last
    assert ckpt["hyper_parameters"]["config"]["channels_last"] is True


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo capture + AOTAutograd, no code generation: seconds
        # TorchInductor's C++ toolchain costs ~30 s before the first kernel on 2 cores
        pytest.param("inductor", marks=pytest.mark.slow),
    ],
)
def test_compile_runs_a_step_and_its_checkpoint_loads_uncompiled(tmp_path, backend):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # one resolution level: half the kernels for TorchInductor to build on a 2-core runner
    losses, ckpt = _run(
        tmp_path, "compiled", "compile=true", f"compile_backend={backend}",
        "trainer.max_steps=1", "model.channel_mults=[1]",
    )  # fmt: skip
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward was compiled
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])
    plain = build_module(compose_train([*TINY, "model.channel_mults=[1]"], tmp_path))
    plain.load_state_dict(ckpt["state_dict"])  # strict: same keys, no wrapper prefix
    assert callable(plain.compile)  # the option does not shadow nn.Module.compile()
    images = load_module(tmp_path / "compiled" / "checkpoints" / "last.ckpt").sample(2, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_host_counted_ema_matches_torch_averaged_model_and_resumes():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    ema_fn = get_ema_multi_avg_fn(0.9)
    with pytest.raises(ValueError, match="needs a multi_avg_fn"):
        HostCountedAveragedModel(net)
    ours = HostCountedAveragedModel(net, multi_avg_fn=ema_fn)
    reference = AveragedModel(net, multi_avg_fn=ema_fn)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net(torch.randn(5, 4))  # moves the BatchNorm buffers
        ours.update_parameters(net)
        reference.update_parameters(net)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.allclose(ours.state_dict()[key], value.to(ours.state_dict()[key].dtype))
    assert int(ours.n_averaged) == 3

    restored = HostCountedAveragedModel(copy.deepcopy(net), multi_avg_fn=ema_fn)
    restored.load_state_dict(ours.state_dict())
    assert restored._host_count == 3  # read once at load: the next update averages
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    restored.update_parameters(net)
    reference.update_parameters(net)
    for a, b in zip(restored.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_clips_gradients_with_a_fused_optimizer(precision):
    """Lightning's own plugin refuses this pair (the GPU default: 16-mixed, fused AdamW,
    clip 1.0); ours unscales first, so the clipped norm is the true one."""

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)
            self.norms: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return (self.layer(batch[0]) * 10).pow(2).mean()  # gradient norms far above 1

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            grads = [p.grad for p in self.parameters()]
            self.norms.append(
                float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            )

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    plugin = precision_plugin(precision, "cpu")
    assert isinstance(plugin, ClippableMixedPrecision)
    net = Net()
    before = net.layer.weight.detach().clone()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=24,
        plugins=[plugin],
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(net, data)
    assert trainer.precision == precision and trainer.global_step == 24
    # seen before clipping and after unscaling: the true norms (x 2**16 if still scaled);
    # 16-mixed's first steps overflow and are skipped while the scaler backs off
    finite = [n for n in net.norms if math.isfinite(n)]
    assert len(finite) >= 8 and all(1 < n < 1e4 for n in finite), net.norms
    assert not torch.equal(net.layer.weight, before) and torch.isfinite(net.layer.weight).all()
