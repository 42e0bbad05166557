"""What the entry points do: ``train(cfg)`` and ``sample(cfg)``.

One direction: config -> objects -> Trainer (``ddpm.runs.prepare``), then ``fit``.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.build import (  # noqa: F401 - the public names of ddpm.cli
    UsageError,
    build_callbacks,
    build_module,
    fail,
    load_module,
    user_error,
)
from ddpm.checkpoints import sweep_partial_files
from ddpm.guards import RunStopped
from ddpm.images import class_grid, save_png, to_uint8
from ddpm.loggers import finish_loggers
from ddpm.metrics import evaluate_images
from ddpm.module import DiffusionModule
from ddpm.runs import (
    Prepared,
    RunComplete,
    check_writable,
    hydra_overrides,
    prepare,
    take_prepared,
)
from ddpm.samplers import Sampler

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Train a diffusion model as ``cfg`` says; return ``cfg.optimized_metric`` for sweeps.

    A bad config stops a single run with one line (exit status 2) before anything is
    written. In a ``-m`` sweep a bad config or a crash fails that job only (a bad job's
    folder is removed); Hydra records it, the other jobs run and keep their results.
    """
    multirun = _multirun()
    prepared = take_prepared(cfg)
    if prepared is None:
        try:
            prepared = prepare(cfg, *hydra_overrides())
        except RunComplete as done:
            log.info("%s", done)
            return None
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            if not multirun:
                fail(message)
            log.error("error: %s (this job is skipped; the sweep goes on)", message)
            _remove_fresh_job_dir()
            raise UsageError(message) from exc
    try:
        return _fit(prepared)
    except RunStopped as stop:
        log.error("%s", stop)
        if multirun:
            raise
        print(f"error: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


def _fit(prepared: Prepared) -> float | None:
    cfg, trainer = prepared.cfg, prepared.trainer
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_config(output_dir / "config.yaml", cfg, prepared.resumed_step)
        sweep_partial_files(output_dir / "checkpoints")
    if prepared.ckpt_path:
        log.info("continuing from %s (step %s)", prepared.ckpt_path, prepared.resumed_step)
    try:
        trainer.fit(
            prepared.module,
            datamodule=prepared.datamodule,
            ckpt_path=prepared.ckpt_path,
            weights_only=True,
        )
    finally:
        finish_loggers(prepared.loggers)
    guard = prepared.guard
    if guard is not None and guard.interrupted_at is not None:
        step, path = guard.interrupted_at
        name = signal.Signals(guard.signal_received).name
        message = (
            f"stopped by {name} after step {step}; saved {path}. "
            f"Continue with: python train.py resume={output_dir}"
        )
        if trainer.is_global_zero:
            log.warning("%s", message)
            print(message, file=sys.stderr)
        raise SystemExit(128 + int(guard.signal_received))
    metric_name = cfg.get("optimized_metric")
    value = trainer.callback_metrics.get(metric_name) if metric_name else None
    return float(value) if value is not None else None


def _write_config(path: Path, cfg: DictConfig, resumed_step: int | None) -> None:
    """Write the resolved config; a resumed run keeps the earlier one beside it when the
    values changed (``config.step=S.yaml``, S the step it continued from)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if path.is_file() and path.read_text() != text and resumed_step is not None:
        path.rename(path.with_name(f"config.step={resumed_step}.yaml"))
    path.write_text(text)


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _remove_fresh_job_dir() -> None:
    """A sweep job with a bad config: remove the folder Hydra made for it, if it holds
    nothing but Hydra's own record and log."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= own:
        logging.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class SamplePlan:
    """What ``sample`` draws with: the checkpoint's module, a sampler, labels, guidance."""

    module: DiffusionModule
    sampler: Sampler | None
    labels: list[int] | None
    guidance: float


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
    check_writable(Path(cfg.out_dir))
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    module = load_module(cfg.ckpt_path).to(device)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    guidance = cfg.get("guidance_scale")
    if guidance is None:  # the scale the run's grids used (0 for unconditional runs)
        stored = module.hparams.config.get("callbacks") or {}
        guidance = (stored.get("sample_grid") or {}).get("guidance_scale") or 0.0
        guidance = guidance if module.num_classes else 0.0
    labels = module.labels_for(range(int(cfg.num_samples)), cfg.get("class_label"), guidance)
    return SamplePlan(module, sampler, labels, guidance)


def sample(cfg: DictConfig) -> Path:
    """Draw ``num_samples`` images from ``ckpt_path``; write grid.png, samples/*.png and
    samples.npz to ``out_dir``. Returns the output folder."""
    plan = take_prepared(cfg)
    if plan is None:
        try:
            plan = prepare_sample(cfg)
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            fail(message)
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
