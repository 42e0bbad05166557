"""``sample.py``'s work: check its values and load the checkpoint (``prepare_sample``,
which writes nothing), then draw and write the images (``draw``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.diffusion.samplers.base import Sampler
from ddpm.evaluation.metrics import evaluate_images
from ddpm.runs.build import load_module
from ddpm.runs.errors import UsageError
from ddpm.runs.prepare import check_writable
from ddpm.training.module import DiffusionModule
from ddpm.training.posthoc_ema import check_sigma_rel, list_snapshots, reconstruct
from ddpm.utils.images import class_grid, save_png, to_uint8


@dataclass
class SamplePlan:
    """What ``sample`` draws with: the checkpoint's module, a sampler, labels, guidance."""

    module: DiffusionModule
    sampler: Sampler | None
    labels: list[int] | None
    guidance: float
    posthoc: dict[str, Any] | None = None  # ema_std's reconstruction: std, step, snapshots


def prepare_sample(cfg: DictConfig) -> SamplePlan:
    """Check ``sample.py``'s values and load the checkpoint (writes nothing)."""
    if cfg.get("ckpt_path") is None:
        raise UsageError("ckpt_path is required: python sample.py ckpt_path=path/to/last.ckpt")
    for key, low in (("num_samples", 1), ("batch_size", 1), ("seed", 0)):
        value = cfg.get(key)
        if key == "batch_size" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(
                f"{key}={value!r} is not allowed: it must be an integer >= {low}"
                + (" (or null for all at once)" if key == "batch_size" else "")
            )
    ema_std = cfg.get("ema_std")
    if ema_std is not None:
        check_sigma_rel(ema_std)
    check_writable(Path(cfg.out_dir))
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    module = load_module(cfg.ckpt_path)
    posthoc = posthoc_ema(module, Path(cfg.ckpt_path), ema_std) if ema_std is not None else None
    module = module.to(device)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    guidance = cfg.get("guidance_scale")
    if guidance is None:  # the scale the run's grids used (0 for unconditional runs)
        stored = module.hparams.config.get("callbacks") or {}
        guidance = (stored.get("sample_grid") or {}).get("guidance_scale") or 0.0
        guidance = guidance if module.num_classes else 0.0
    labels = module.labels_for(range(int(cfg.num_samples)), cfg.get("class_label"), guidance)
    return SamplePlan(module, sampler, labels, guidance, posthoc)


def snapshot_folder(ckpt_path: Path, config: dict[str, Any]) -> Path:
    """Where a power-EMA run's snapshots are: ``ema_snapshots`` in the checkpoint's run
    folder (RUN/checkpoints/x.ckpt -> RUN/ema_snapshots, so a moved run folder works),
    else the ``dirpath`` its config recorded."""
    beside = ckpt_path.resolve().parent.parent / "ema_snapshots"
    recorded = ((config.get("callbacks") or {}).get("ema") or {}).get("dirpath")
    if list_snapshots(beside) or recorded is None:
        return beside
    return Path(recorded)


def posthoc_ema(module: DiffusionModule, ckpt_path: Path, ema_std: float) -> dict[str, Any]:
    """Load into ``module`` the EMA of length ``ema_std`` that post-hoc EMA reconstructs
    (Karras et al. 2024, Algorithm 3) from the run's snapshots up to the checkpoint's
    step; returns what was used (std, step, folder, number of snapshots)."""
    # load_module has read and checked this file; the step alone needs no tensor read
    step = int(
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    )
    folder = snapshot_folder(ckpt_path, module.hparams.config)
    state, used_step = reconstruct(folder, step, float(ema_std))
    own = module.state_dict()
    foreign = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if foreign:
        raise UsageError(
            f"the EMA snapshots in {folder} do not fit the network of {ckpt_path} "
            f"(e.g. {foreign[0]}): they come from another run"
        )
    module.load_state_dict(state, strict=False)  # the averaged tensors; buffers stay
    used = len([s for s in list_snapshots(folder) if s[0] <= used_step])
    print(
        f"post-hoc EMA: ema_std={float(ema_std)} at step {used_step} "
        f"(checkpoint step {step}) from {used} snapshots in {folder}"
    )
    return {
        "ema_std": float(ema_std),
        "step": used_step,
        "ckpt_step": step,
        "snapshots": used,
        "folder": str(folder),
    }


def draw(cfg: DictConfig, plan: SamplePlan) -> Path:
    """Draw ``cfg.num_samples`` images as ``plan`` says; write grid.png, samples/*.png,
    samples.npz and samples.json (and metrics.json with ``evaluate=true``) to
    ``cfg.out_dir``. Returns the output folder."""
    module, sampler, labels, guidance = plan.module, plan.sampler, plan.labels, plan.guidance

    images = module.sample(
        int(cfg.num_samples),
        seed=int(cfg.seed),
        batch_size=cfg.get("batch_size"),
        sampler=sampler,
        progress=True,
        labels=labels,
        guidance_scale=guidance,
    )
    pixels = to_uint8(images)  # [N, H, W, C] uint8
    out = Path(cfg.out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        save_png(image, out / "samples" / f"{i:05d}.png")
    save_png(class_grid(pixels, labels), out / "grid.png")
    arrays = (
        {"images": pixels} if labels is None else {"images": pixels, "labels": np.array(labels)}
    )
    np.savez_compressed(out / "samples.npz", **arrays)
    used = sampler or module.sampler
    info = {
        "ckpt_path": str(cfg.ckpt_path),
        "num_samples": int(cfg.num_samples),
        "seed": int(cfg.seed),
        "class_label": cfg.get("class_label"),
        "guidance_scale": guidance,
        "posthoc_ema": plan.posthoc,
        "sampler": {
            "name": type(used).__name__,
            **{k: v for k, v in vars(used).items() if not k.startswith("_")},
        },
    }
    (out / "samples.json").write_text(json.dumps(info, indent=2, default=str))
    if cfg.get("evaluate"):
        datamodule = instantiate(OmegaConf.create(module.hparams.config["data"]))
        report = evaluate_images(
            images, datamodule, cfg.get("feature_extractor"), cfg.reference_split, module.device
        )
        metrics = {**report, **info}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        print(
            f"fid={report['fid']:.3f} kid={report['kid_mean']:.4g}±{report['kid_std']:.2g} "
            f"({report['feature_extractor']} features, {report['num_samples']} samples "
            f"vs {report['reference']['num_images']} {report['reference']['split']} images)"
        )
    print(f"wrote {len(pixels)} samples to {out}")
    return out
