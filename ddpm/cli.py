"""What the entry points do: ``train(cfg)`` and ``sample(cfg)``.

One direction: config -> objects -> Trainer. Every object comes from a ``_target_`` node;
the typed constructors validate their arguments and raise ValueError naming the key.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, WeightAveraging
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.callbacks import SampleQuality
from ddpm.images import class_grid, save_png, to_uint8
from ddpm.loggers import build_loggers, finish_loggers
from ddpm.metrics import evaluate_images
from ddpm.module import DiffusionModule


def auto_precision() -> str:
    """``precision=auto``: 16-mixed on a CUDA GPU, full float32 elsewhere."""
    return "16-mixed" if torch.cuda.is_available() else "32-true"


OmegaConf.register_new_resolver("ddpm.auto_precision", auto_precision, replace=True)
OmegaConf.register_new_resolver("ddpm.cuda", torch.cuda.is_available, replace=True)
# Lightning 2.6 on torch >= 2.10 warns about a torch-internal pytree API at every fit: noise.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def user_error(exc: BaseException) -> str | None:
    """The message of the ValueError/UsageError at the root of ``exc``, if there is one."""
    while exc is not None:
        if isinstance(exc, UsageError | ValueError | FileNotFoundError):
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        if not isinstance(exc, InstantiationException):
            return None
        exc = exc.__cause__
    return None


def build_module(cfg: DictConfig) -> DiffusionModule:
    """Instantiate net, schedule, objective, sampler and the module from a run config."""
    image_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    lr_scheduler = cfg.get("lr_scheduler")
    return DiffusionModule(
        net=instantiate(cfg.model),
        schedule=instantiate(cfg.schedule),
        objective=instantiate(cfg.objective),
        sampler=instantiate(cfg.sampler),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(lr_scheduler) if lr_scheduler is not None else None,
        image_shape=image_shape,
        val_seed=cfg.get("val_seed", 0),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[L.Callback]:
    """Instantiate ``cfg.callbacks`` and the ``cfg.eval`` (FID/KID) callback.

    Weight averaging goes last, so that the other validation-time callbacks run while the
    averaged (EMA) weights are swapped in. Without a logger, LearningRateMonitor (which
    needs one) is left out; with ``trainer.enable_progress_bar=false``, the progress bar.
    """
    nodes = list((cfg.get("callbacks") or {}).values())
    if cfg.get("eval") is not None:
        nodes.append(cfg.eval)
    callbacks = [
        instantiate(node) for node in nodes if isinstance(node, DictConfig) and "_target_" in node
    ]
    if not has_logger:
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if (cfg.get("trainer") or {}).get("enable_progress_bar", True) is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    return sorted(callbacks, key=lambda cb: isinstance(cb, WeightAveraging))


def _multirun_group() -> str | None:
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def train(cfg: DictConfig) -> float | None:
    """Train a diffusion model as ``cfg`` says; return ``cfg.optimized_metric`` for sweeps."""
    try:
        OmegaConf.resolve(cfg)
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")  # fail on bad data before any training starts
        if datamodule.conditional:
            with open_dict(cfg):  # the net's class count comes from the data, stored with it
                cfg.model.num_classes = datamodule.num_classes
        module = build_module(cfg)
        loggers = build_loggers(cfg.get("logger"), group=_multirun_group())
        callbacks = build_callbacks(cfg, has_logger=bool(loggers))
        for callback in callbacks:
            if isinstance(callback, SampleQuality):
                callback.load_extractor(datamodule)  # a missing download fails here, at once
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        fail(message)

    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        finish_loggers(loggers)

    metric_name = cfg.get("optimized_metric")
    value = trainer.callback_metrics.get(metric_name) if metric_name else None
    return float(value) if value is not None else None


def _strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``_orig_mod.`` segments that ``torch.compile`` adds to parameter names."""
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild a DiffusionModule from a checkpoint file alone (its stored config plus its
    weights; ``state_dict`` holds the EMA weights when EMA was on)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path} (pass ckpt_path=path/to/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"cannot read checkpoint {path}: {type(exc).__name__}: {reason}") from exc
    config = (ckpt.get("hyper_parameters") or {}).get("config") if isinstance(ckpt, dict) else None
    if config is None or "state_dict" not in ckpt:
        raise UsageError(f"{path} is not a ddpm training checkpoint (no stored config or weights)")
    module = build_module(OmegaConf.create(config))
    module.load_state_dict(_strip_compile_prefix(ckpt["state_dict"]))
    return module.eval()


def sample(cfg: DictConfig) -> Path:
    """Draw ``num_samples`` images from ``ckpt_path``; write grid.png, samples/*.png and
    samples.npz to ``out_dir``. Returns the output folder."""
    try:
        if cfg.get("ckpt_path") is None:
            raise UsageError("ckpt_path is required: python sample.py ckpt_path=path/to/last.ckpt")
        if int(cfg.num_samples) < 1:
            raise UsageError(f"num_samples={cfg.num_samples} must be >= 1")
        if cfg.get("batch_size") is not None and int(cfg.batch_size) < 1:
            raise UsageError(f"batch_size={cfg.batch_size} must be >= 1 (or null for all at once)")
        device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        module = load_module(cfg.ckpt_path).to(device)
        sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
        guidance = cfg.get("guidance_scale")
        if guidance is None:  # the scale the run's grids used (0 for unconditional runs)
            stored = module.hparams.config.get("callbacks") or {}
            guidance = (stored.get("sample_grid") or {}).get("guidance_scale") or 0.0
            guidance = guidance if module.num_classes else 0.0
        labels = module.labels_for(range(int(cfg.num_samples)), cfg.get("class_label"), guidance)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        fail(message)

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
        "sampler": {
            "name": type(used).__name__,
            **{k: v for k, v in vars(used).items() if not k.startswith("_")},
        },
    }
    (out / "samples.json").write_text(json.dumps(info, indent=2, default=str))
    if cfg.get("evaluate"):
        datamodule = instantiate(OmegaConf.create(module.hparams.config["data"]))
        report = evaluate_images(
            images, datamodule, cfg.get("feature_extractor"), cfg.reference_split, device
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
