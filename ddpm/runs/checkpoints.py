"""Checkpoints that cannot be lost or abused: atomic writes, safe reads, clear refusals.

- ``AtomicCheckpointIO`` writes every checkpoint with ``ddpm.utils.files.atomic_torch_save``
  (a temporary file in the target's own directory, fsynced and renamed over the target): a
  process killed mid-write leaves the previous checkpoint whole.
- ``read_checkpoint`` loads with ``weights_only=True`` (a checkpoint cannot run code),
  turns a truncated, corrupt or foreign file into one line naming the problem, and points
  the stored config of an older checkpoint at today's module paths (``ddpm.runs.legacy``).
- ``config_differences`` says what differs between a checkpoint's stored config and the
  run's, for checkpoints that do not fit the model being built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddpm.runs.legacy import upgrade_targets
from ddpm.utils.files import atomic_torch_save

# The config keys that fix the network's parameter shapes and what its output means: a
# checkpoint whose values differ here cannot continue (or be sampled as) this run.
ARCHITECTURE_KEYS = (
    "model",
    "data.image_size",
    "data.channels",
    "objective._target_",
    "objective.prediction_type",
    "objective.preconditioning._target_",
    "objective.preconditioning.sigma_data",
)
# How fresh weights are drawn (a continued run loads its weights instead; checkpoints from
# before model.init existed were PyTorch-initialised) and whether blocks are recomputed in the
# backward pass (memory only, same parameters and outputs): these may differ, or be absent.
NOT_ARCHITECTURE = ("model.init", "model.checkpointing")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why, in one line."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with crash-safe local writes (tmp file, fsync, rename)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if not isinstance(get_filesystem(path), type(get_filesystem("."))):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec
        atomic_torch_save(checkpoint, Path(path))


def newest_checkpoint(run_dir: Path) -> Path:
    """The most recently written complete checkpoint of a run folder (partial writes have
    another suffix, so they are never picked)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    # checkpoints/*.ckpt, and Lightning's SLURM requeue checkpoints in the run folder
    candidates = [*ckpt_dir.glob("*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise CheckpointError(
            f"resume={run_dir} has no checkpoint to continue from ({ckpt_dir}/*.ckpt); "
            "pass a run folder written by train.py, or start a new run"
        )
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ddpm checkpoint safely (``weights_only=True``), or raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass ckpt_path=path/to/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(describe_load_error(path, exc)) from exc
    config = (ckpt.get("hyper_parameters") or {}).get("config") if isinstance(ckpt, dict) else None
    if config is None or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a ddpm training checkpoint (no stored config or weights)"
        )
    ckpt["hyper_parameters"]["config"] = upgrade_targets(config)  # older module paths
    return ckpt


def describe_load_error(path: Path, exc: BaseException) -> str:
    """One line for a checkpoint torch cannot load: truncated, unsafe or unreadable."""
    text = str(exc)
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    if "GLOBAL" in text or "Unsupported global" in text:  # names code to import or call
        unsafe = next(
            (ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln), first
        )
        return (
            f"refusing to load {path}: it contains objects other than tensors and plain "
            f"values ({unsafe[:160]}); ddpm loads checkpoints with weights_only=True so a "
            "file cannot run code. Only load checkpoints you trust through other tools"
        )
    if (
        "zip archive" in text
        or "central directory" in text
        or "Unsupported operand" in text  # not a pickle at all
        or isinstance(exc, EOFError)
    ):
        size = path.stat().st_size
        return (
            f"checkpoint {path} is truncated or corrupt ({size:,} bytes, not a whole "
            "checkpoint file); use an earlier checkpoint of the run"
        )
    return f"cannot read checkpoint {path}: {type(exc).__name__}: {first[:200]}"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(
    stored: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = ARCHITECTURE_KEYS
) -> list[str]:
    """``key: checkpoint A, this run B`` for every leaf under ``keys`` that differs."""
    old, new = _flatten(stored), _flatten(current)
    diffs = []
    for name in sorted(set(old) | set(new)):
        if not any(name == k or name.startswith(f"{k}.") for k in keys):
            continue
        if name in NOT_ARCHITECTURE:
            continue
        if old.get(name, "<absent>") != new.get(name, "<absent>"):
            diffs.append(
                f"{name}: checkpoint {old.get(name, '<absent>')}, "
                f"this run {new.get(name, '<absent>')}"
            )
    return diffs


def check_fits(path: Path, stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to continue a run from a checkpoint of another model, saying what differs."""
    diffs = config_differences(stored, current)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was trained with another model: {'; '.join(diffs[:4])}"
            + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")
            + "; use the checkpoint's settings, or resume=RUN_DIR to take them from the run"
        )


def state_dict_mismatch(path: Path, missing: list[str], unexpected: list[str]) -> str:
    """One line for weights that do not fit the network their config builds."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return (
        f"the weights in {path} do not fit the network its stored config builds: "
        f"{', '.join(parts)} parameters; it was not written by this version of ddpm"
    )
