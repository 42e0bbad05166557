"""The EDM-family peer: k-diffusion (Katherine Crowson's reference implementation of Karras
et al. 2022), trained with its own classes (``pip install -e ".[bench]"``, then k-diffusion
as docs/quality.md says) for benchmarks/quality_vs_peer.py.

What is k-diffusion's, and what is adapted to the image size:
- ``configs/config_mnist.json`` of its repository: ``image_v1`` UNet (depths 2/4/4, self-
  attention on the deepest level, mapping width 256, dropout 0.05), Karras augmentation
  (``KarrasAugmentationPipeline``, probability 0.12, the conditioning fed to the net;
  its x-flip is always on, conditioned), ``sigma_data`` 0.6162, sigma in [1e-2, 80], the
  ``cosine`` (v-diffusion) sigma density, AdamW lr 2e-4, betas (0.95, 0.999), eps 1e-6,
  weight decay 1e-3, constant lr, the inverse EMA warm-up (power 2/3, at most 0.9999),
  batch 64 (its train.py default), no gradient clipping, as its train.py loop does;
- the loss weighting: that config names ``sqrt-snr``, which the released package
  (0.1.1.post1) does not have; ``soft-min-snr``, the package's nearest, is used;
- widths: 128/128/256 at 28x28 (the config's); at 8x8 a quarter, 32/32/64 (the full net
  takes 4x the CPU time per step on a 64x smaller image; the diffusers peer is scaled the
  same way);
- sampling as its train.py's demo and evaluation: 50 Karras sigmas (rho 7),
  ``sample_dpmpp_2m_sde`` with eta 0 and the Heun solver type (50 network calls).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SIGMA_MIN, SIGMA_MAX = 1e-2, 80.0


def config(image_size: int) -> dict:
    """k-diffusion's config_mnist.json at this image size (widths: the module docstring)."""
    channels = [128, 128, 256] if image_size >= 28 else [32, 32, 64]
    return {
        "model": {
            "type": "image_v1",
            "input_channels": 1,
            "input_size": [image_size, image_size],
            "patch_size": 1,
            "mapping_out": 256,
            "depths": [2, 4, 4],
            "channels": channels,
            "self_attn_depths": [False, False, True],
            "has_variance": False,
            "loss_config": "karras",
            "loss_weighting": "soft-min-snr",
            "dropout_rate": 0.05,
            "augment_wrapper": True,
            "augment_prob": 0.12,
            "sigma_data": 0.6162,
            "sigma_min": SIGMA_MIN,
            "sigma_max": SIGMA_MAX,
            "sigma_sample_density": {"type": "cosine"},
        },
        "dataset": {"type": "mnist"},
        "optimizer": {
            "type": "adamw",
            "lr": 2e-4,
            "betas": [0.95, 0.999],
            "eps": 1e-6,
            "weight_decay": 1e-3,
        },
        "lr_sched": {"type": "constant", "warmup": 0.0},
        "ema_sched": {"type": "inverse", "power": 0.6667, "max_value": 0.9999},
    }


def build(image_size: int) -> tuple[dict, torch.nn.Module]:
    """The config and its denoiser (Karras preconditioning around the augmented UNet)."""
    import k_diffusion as K

    cfg = K.config.load_config(config(image_size))
    inner = K.config.make_model(cfg)
    return cfg, K.config.make_denoiser_wrapper(cfg)(inner)


def augmented_batch(images: Tensor, pipeline: object) -> tuple[Tensor, Tensor]:
    """k-diffusion's augmentation of each image (it works on PIL images, as its data
    loader does): images [B, 1, H, W] in [-1, 1] -> (augmented [B, 1, H, W], cond [B, 9])."""
    out, conds = [], []
    for image in images:
        pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        augmented, _, cond = pipeline(Image.fromarray(pixels))
        out.append(augmented.float())
        conds.append(cond)
    return torch.stack(out), torch.stack(conds)


def train_peer(images: Tensor, budget_s: float, seed: int, out: Path) -> dict:
    """Train on ``images`` [N, 1, S, S] in [-1, 1] until ``budget_s`` wall seconds (from
    this call) have passed; saves the EMA denoiser to ``out/model_ema.pt``."""
    import k_diffusion as K

    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    size = images.shape[-1]
    cfg, model = build(size)
    model_ema = copy.deepcopy(model)
    opt_cfg = cfg["optimizer"]
    opt = torch.optim.AdamW(
        model.inner_model.param_groups(opt_cfg["lr"]),
        lr=opt_cfg["lr"],
        betas=tuple(opt_cfg["betas"]),
        eps=opt_cfg["eps"],
        weight_decay=opt_cfg["weight_decay"],
    )
    ema_sched = K.utils.EMAWarmup(power=0.6667, max_value=0.9999)
    sample_density = K.config.make_sample_density(cfg["model"])
    pipeline = K.augmentation.KarrasAugmentationPipeline(cfg["model"]["augment_prob"])
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    model.train()
    while time.perf_counter() - start < budget_s:
        idx = torch.randint(0, images.shape[0], (64,), generator=generator)
        reals, aug_cond = augmented_batch(images[idx], pipeline)
        noise = torch.randn_like(reals)
        sigma = sample_density([reals.shape[0]], device="cpu")
        loss = model.loss(reals, noise, sigma, aug_cond=aug_cond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        K.utils.ema_update(model, model_ema, ema_sched.get_value())
        ema_sched.step()
        steps += 1
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model_ema.state_dict(), out / "model_ema.pt")
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "params": sum(p.numel() for p in model.parameters()),
        "weights": str(out / "model_ema.pt"),
        "image_size": size,
    }


@torch.no_grad()
def sample_peer(
    weights: Path, image_size: int, steps: int, num: int, seed: int, batch_size: int = 500
) -> Tensor:
    """``num`` images [N, 1, S, S] in [-1, 1] from the EMA denoiser, drawn as k-diffusion's
    train.py draws its demo grids and FID samples."""
    import k_diffusion as K

    _, model = build(image_size)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    sigmas = K.sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, rho=7.0)
    torch.manual_seed(seed)  # its SDE solver draws from the global generator (eta 0: none)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for first in range(0, num, batch_size):
        shape = (min(batch_size, num - first), 1, image_size, image_size)
        x = torch.randn(shape, generator=generator) * SIGMA_MAX
        x0 = K.sampling.sample_dpmpp_2m_sde(
            model, x, sigmas, eta=0.0, solver_type="heun", disable=True
        )
        out.append(x0.clamp(-1, 1))
    return torch.cat(out)
