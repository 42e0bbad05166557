"""Training and sampling throughput of ddpm's UNet next to diffusers' UNet2DModel.

    python benchmarks/throughput.py [--models tiny small ddpm_cifar10] [--precision 32-true]
        [--compile] [--channels-last true|false] [--batch-size N] [--steps 5]

For each model config (at its natural image size: tiny on 8x8x1 digits, small on 28x28x1
MNIST, ddpm_cifar10 on 32x32x3) it builds our UNet from ``conf/model/<name>.yaml`` and
diffusers' ``UNet2DModel`` with the same widths, depths and attention resolutions, and runs
both through the same loop in this process: the DDPM loss of ``ddpm.diffusion.objectives``,
backward, gradient clipping, fused AdamW. It prints, per row, training images/s, sampling images/s
(20-step DDIM), peak memory, model-FLOPs utilisation (FLOPs of one training step counted by
``FlopCounterMode``; peak FLOP/s measured with a large matmul in the same run) and the ratio
ours / diffusers. diffusers comes from the optional extra: ``pip install -e ".[bench]"``.

Our rows use the project's defaults (``channels_last`` from the config unless given);
diffusers runs as a user would run it, in its default memory format.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import ddpm.runs.cli  # noqa: F401 - registers the ${ddpm.*} resolvers
from ddpm.diffusion.objectives import DiffusionLoss
from ddpm.diffusion.samplers import DDIMSampler
from ddpm.diffusion.schedules import NoiseSchedule

CONF = Path(__file__).resolve().parents[1] / "conf"
# model config -> the data it is meant for (natural image size and channels)
DATA = {"tiny": "digits", "small": "mnist", "ddpm_cifar10": "cifar10"}
DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class Row:
    name: str
    params: int
    train_ips: float
    sample_ips: float
    peak_mib: float
    mfu: float


def compose_run(model: str, overrides: list[str]) -> object:
    """The run config of ``model=<model> data=<its data>`` as train.py would compose it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", f"data={DATA[model]}", *overrides])


def diffusers_unet(model_cfg: object) -> nn.Module:
    """diffusers' UNet2DModel with our config's widths, depths, attention resolutions,
    heads, dropout, GroupNorm(32, eps 1e-6) and Ho et al.'s [sin, cos] time embedding."""
    from diffusers import UNet2DModel

    mults = list(model_cfg.channel_mults)
    widths = [model_cfg.base_channels * m for m in mults]
    attn = [
        model_cfg.image_size // 2**i in model_cfg.attention_resolutions for i in range(len(mults))
    ]
    heads = model_cfg.attention_heads
    net = UNet2DModel(
        sample_size=model_cfg.image_size,
        in_channels=model_cfg.in_channels,
        out_channels=model_cfg.in_channels,
        block_out_channels=widths,
        layers_per_block=model_cfg.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=None if heads == 1 else widths[0] // heads,
        norm_num_groups=32,
        norm_eps=1e-6,
        dropout=model_cfg.dropout,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=1,
    )

    class Adapter(nn.Module):
        def __init__(self, unet: nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            return self.unet(x, t).sample

    return Adapter(net)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_flops(device: torch.device, precision: str, seconds: float = 3.0) -> float:
    """Achievable FLOP/s of this device: the fastest of repeated large matmuls in the
    training precision (the best call, so a busy moment does not lower the peak)."""
    dtype = DTYPES[precision] or torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train_loop(
    net: nn.Module, x0: Tensor, precision: str, channels_last: bool
) -> Callable[[], None]:
    """One training step as DiffusionModule + Lightning run it: loss, backward, clip, AdamW."""
    device = x0.device
    schedule = NoiseSchedule.from_name("cosine", num_timesteps=1000).to(device)
    objective = DiffusionLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = objective(net, schedule, x0).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure(
    name: str,
    net: nn.Module,
    shape: tuple[int, ...],
    args: argparse.Namespace,
    device: torch.device,
    peak: float,
    channels_last: bool,
) -> Row:
    torch.manual_seed(0)
    net = net.to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net, dynamic=False) if args.compile else net  # as compile=true
    x0 = torch.randn(shape, device=device).clamp(-1, 1)
    step = train_loop(fwd, x0, args.precision, channels_last)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    reset_peak(device)
    train_s = timed(step, device, args.warmup, args.steps)
    memory = peak_mib(device)

    sampler = DDIMSampler(steps=args.sample_steps)
    schedule = NoiseSchedule.from_name("cosine", num_timesteps=1000).to(device)
    net.eval()

    def draw() -> Tensor:
        with torch.no_grad(), autocast(device, args.precision):
            return sampler.sample(
                fwd, schedule, shape, generator=torch.Generator(device).manual_seed(0)
            )

    sample_s = timed(draw, device, 1, max(1, args.steps // 2))
    params = sum(p.numel() for p in net.parameters())
    return Row(
        name, params, shape[0] / train_s, shape[0] / sample_s, memory, flops / train_s / peak
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--precision", default="32-true", choices=list(DTYPES))
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: 128 on GPU; on CPU 64 (tiny), 32 (small), 16 (ddpm_cifar10)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile both nets")
    parser.add_argument(
        "--channels-last",
        choices=["true", "false"],
        default=None,
        help="for our net (default: the config's channels_last)",
    )
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device, args.precision)
    print(
        f"device {device} ({torch.get_num_threads()} threads), precision {args.precision}, "
        f"compile {args.compile}; matmul peak {peak / 1e12:.3f} TFLOP/s"
    )
    header = (
        f"{'model':<14}{'impl':<10}{'batch':>6}{'params':>12}{'train img/s':>13}"
        f"{'sample img/s':>14}{'peak MiB':>10}{'MFU':>8}"
    )
    print(header)
    for model in args.models:
        cfg = compose_run(model, [])
        batch = args.batch_size or (
            128 if device.type == "cuda" else {"tiny": 64, "small": 32, "ddpm_cifar10": 16}[model]
        )
        shape = (batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        ours_cl = cfg.channels_last if args.channels_last is None else args.channels_last == "true"
        rows = [measure("ours", instantiate(cfg.model), shape, args, device, peak, ours_cl)]
        if not args.no_diffusers:
            rows.append(
                measure("diffusers", diffusers_unet(cfg.model), shape, args, device, peak, False)
            )
        for row in rows:
            print(
                f"{model:<14}{row.name:<10}{batch:>6}{row.params:>12,}{row.train_ips:>13.1f}"
                f"{row.sample_ips:>14.1f}{row.peak_mib:>10.0f}{row.mfu:>8.1%}"
            )
        if len(rows) == 2:
            ours, theirs = rows
            print(
                f"{model:<14}{'ratio':<10}{'':>6}{ours.params / theirs.params:>12.3f}"
                f"{ours.train_ips / theirs.train_ips:>13.2f}"
                f"{ours.sample_ips / theirs.sample_ips:>14.2f}"
                f"{ours.peak_mib / theirs.peak_mib:>10.2f}"
            )


if __name__ == "__main__":
    main()
