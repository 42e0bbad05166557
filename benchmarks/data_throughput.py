"""Images per second delivered by each loader mode, next to the training step rate of the
``ddpm_cifar10`` net, to show whether data or compute bounds a run on this machine.

    python benchmarks/data_throughput.py [--images 50000] [--batch-size 128]

CIFAR-10-format data is fabricated (five pickled batches of random pixels) in a temporary
folder; a folder of PNG files stands in for the streaming mode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm.data.datamodule import ImageDataModule
from ddpm.diffusion.objectives import DiffusionLoss
from ddpm.diffusion.schedules import NoiseSchedule
from ddpm.nets.unet import UNet
from tests.fabricate import write_cifar10, write_folder


def loader_rate(data: ImageDataModule, device: torch.device, max_batches: int) -> float:
    """Images/s through train_dataloader and on_after_batch_transfer (the real path)."""
    data.setup("fit")

    class _Trainer:  # on_after_batch_transfer flips only while training
        training = True

    data.trainer = _Trainer()
    loader = data.train_dataloader()
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i == max_batches:
            break
        batch = (
            batch.to(device)
            if isinstance(batch, torch.Tensor)
            else tuple(b.to(device, non_blocking=True) for b in batch)
        )
        x, _, _ = data.on_after_batch_transfer(batch, 0)
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def train_rate(device: torch.device, batch_size: int, steps: int) -> float:
    """Images/s of Ho et al.'s CIFAR-10 net (35.7M params), fp32 training steps."""
    net = UNet(
        image_size=32,
        in_channels=3,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    ).to(device)
    schedule = NoiseSchedule.from_name("linear").to(device)
    loss_fn, opt = DiffusionLoss(), torch.optim.Adam(net.parameters(), lr=2e-4)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    for i in range(steps + 1):
        if i == 1:  # the first step warms up allocators and kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = loss_fn(net, schedule, x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200, help="batches timed per mode")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar10(root, per_batch=args.images // 5)
        write_folder(root / "folder", per_class=1000, corrupt=False)
        common = {
            "name": "cifar10",
            "root": str(root),
            "image_size": 32,
            "channels": 3,
            "batch_size": args.batch_size,
            "hflip": True,
        }
        folder = {**common, "name": "folder", "root": str(root / "folder")}
        modes = {
            "cifar10 in-memory, 0 workers": ImageDataModule(**common),
            "cifar10 in-memory, 2 workers": ImageDataModule(**common, num_workers=2),
            "cifar10 device-resident": ImageDataModule(**common, device_resident=True),
            "folder PNG streaming, 2 workers": ImageDataModule(
                **folder, in_memory=False, num_workers=2
            ),
            "folder PNG in-memory": ImageDataModule(**folder),
        }
        for name, data in modes.items():
            rate = loader_rate(data, device, args.batches)
            print(f"{name:34s} {rate:12,.0f} images/s")
    rate = train_rate(device, args.batch_size, args.train_steps)
    print(f"{'ddpm_cifar10 training (fp32)':34s} {rate:12,.1f} images/s")


if __name__ == "__main__":
    main()
