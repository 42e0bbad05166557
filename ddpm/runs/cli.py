"""What the entry points do: ``train(cfg)`` and ``sample(cfg)`` (``train.py``, ``sample.py``).

One direction: config -> objects -> Trainer (``ddpm.runs.prepare``), then ``fit``.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.runs.errors import UsageError, fail, user_error
from ddpm.runs.loggers import finish_loggers
from ddpm.runs.prepare import Prepared, RunComplete, hydra_overrides, multirun, prepare
from ddpm.runs.prepare_first import take_prepared
from ddpm.runs.sampling import draw, prepare_sample
from ddpm.training.guards import RunStopped
from ddpm.utils.files import sweep_partial_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Train a diffusion model as ``cfg`` says; return ``cfg.optimized_metric`` for sweeps.

    A bad config stops a single run with one line (exit status 2) before anything is
    written. In a ``-m`` sweep a bad config or a crash fails that job only (a bad job's
    folder is removed); Hydra records it, the other jobs run and keep their results.
    """
    in_sweep = multirun()
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
            if not in_sweep:
                fail(message)
            log.error("error: %s (this job is skipped; the sweep goes on)", message)
            _remove_fresh_job_dir()
            raise UsageError(message) from exc
    try:
        return _fit(prepared)
    except RunStopped as stop:
        log.error("%s", stop)
        if in_sweep:
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
    if trainer.is_global_zero and prepared.batch_line:
        log.info("%s", prepared.batch_line)
    if prepared.ckpt_path:
        log.info("continuing from %s (step %s)", prepared.ckpt_path, prepared.resumed_step)
    try:
        trainer.fit(
            prepared.module,
            datamodule=prepared.datamodule,
            ckpt_path=prepared.ckpt_path,
            weights_only=True,
        )
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        where = out_of_memory(exc)
        if where is None:
            raise
        message = (
            f"out of {where} memory at data.batch_size={cfg.data.batch_size}: recompute "
            "activations with model.checkpointing=true, use a smaller data.batch_size with "
            "trainer.accumulate_grad_batches=K for the same global batch, or "
            "precision=bf16-mixed"
        )
        log.error("error: %s", message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
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


def out_of_memory(exc: BaseException) -> str | None:
    """``GPU`` or ``host`` when ``exc`` (or what it wraps) is an allocation failure."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return "GPU"
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            return "host"
        exc = exc.__cause__ or exc.__context__
    return None


def _write_config(path: Path, cfg: DictConfig, resumed_step: int | None) -> None:
    """Write the resolved config; a resumed run keeps the earlier one beside it when the
    values changed (``config.step=S.yaml``, S the step it continued from)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if path.is_file() and path.read_text() != text and resumed_step is not None:
        path.rename(path.with_name(f"config.step={resumed_step}.yaml"))
    path.write_text(text)


def _remove_fresh_job_dir() -> None:
    """A sweep job with a bad config: remove the folder Hydra made for it, if it holds
    nothing but Hydra's own record and log."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= own:
        logging.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def sample(cfg: DictConfig) -> Path:
    """Draw ``num_samples`` images from ``ckpt_path`` into ``out_dir`` (see
    ``ddpm.runs.sampling.draw``); a bad value stops with one line. Returns the folder."""
    # Hydra's folder for this job: out_dir itself, a job's folder under it in a -m sweep,
    # and for the DDP processes Lightning starts, rank 0's (it passes hydra.run.dir on)
    with open_dict(cfg):
        cfg.out_dir = HydraConfig.get().runtime.output_dir
    plan = take_prepared(cfg)
    if plan is None:
        try:
            plan = prepare_sample(cfg)
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            fail(message)
    return draw(cfg, plan)
