"""What rank 0 writes once every chunk of a draw is on disk: ``samples.npz`` (streamed),
``grid.png``, ``samples.json`` and, with ``evaluate=true``, ``metrics.json``: FID/KID per
block of ``num_samples`` indices (EDM's protocol: blocks of disjoint indices, i.e. seeds,
mean and std of FID over them), from features gathered across ranks, streamed per chunk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.evaluation.features import extract_features
from ddpm.evaluation.metrics import fid_kid
from ddpm.evaluation.stats_file import KID_MAX_REAL, FeatureMoments, ReferenceStats
from ddpm.runs.draw import DrawSpec
from ddpm.runs.draw_files import chunk_path, iter_chunks, merge_samples, num_chunks
from ddpm.runs.errors import UsageError
from ddpm.utils.images import class_grid, save_png

GRID_SAMPLES = 100  # grid.png shows the first samples only, whatever the draw's size


def write_outputs(spec: DrawSpec, image_shape: tuple[int, ...]) -> None:
    """Check that every chunk is there, then write ``samples.npz`` and ``grid.png``."""
    missing = [
        k
        for k in range(num_chunks(spec.total, spec.chunk_size))
        if not chunk_path(spec.out, k).is_file()
    ]
    if missing:
        raise UsageError(
            f"{len(missing)} chunks of the draw in {spec.out} are missing (e.g. "
            f"{chunk_path(spec.out, missing[0]).name}): rerun the same command to draw them"
        )
    merge_samples(spec.out, spec.total, spec.chunk_size, image_shape)
    images, labels = [], []
    for data in iter_chunks(spec.out, spec.total, spec.chunk_size):
        images.append(data["images"])
        labels.append(data.get("labels"))
        if sum(len(x) for x in images) >= GRID_SAMPLES:
            break
    first = np.concatenate(images)[:GRID_SAMPLES]  # [n, H, W, C]
    chosen = None if labels[0] is None else np.concatenate(labels)[:GRID_SAMPLES].tolist()
    save_png(class_grid(first, chosen), spec.out / "grid.png")


def evaluate_draw(
    spec: DrawSpec,
    num_samples: int,
    reference: ReferenceStats,
    extractor: nn.Module,
    device: torch.device | str,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, Any]:
    """FID/KID of each block of ``num_samples`` indices against ``reference``, from the
    chunks' features (computed here, in the same batches, for chunks drawn without them);
    one chunk in memory at a time plus at most ``KID_MAX_REAL`` features per block."""
    blocks = spec.total // num_samples
    dim = int(reference.dim)
    moments = [FeatureMoments(dim) for _ in range(blocks)]
    kid_sample: list[list[Tensor]] = [[] for _ in range(blocks)]
    for data in iter_chunks(spec.out, spec.total, spec.chunk_size):
        _accumulate(data, spec, num_samples, extractor, device, moments, kid_sample)
    per_block = []
    for block in range(blocks):
        numbers = fid_kid(
            reference,
            moments[block],
            kid_subsets,
            kid_subset_size,
            kid_features=torch.cat(kid_sample[block]),
        )
        indices = [block * num_samples, (block + 1) * num_samples]
        per_block.append({**numbers, "indices": indices})
    fids = np.array([b["fid"] for b in per_block])
    report: dict[str, Any] = {
        "fid": float(fids.mean()),
        "fid_std": float(fids.std(ddof=1)) if blocks > 1 else None,
        "kid_mean": _mean([b["kid_mean"] for b in per_block]),
        "kid_std": _mean([b["kid_std"] for b in per_block]),
        "num_samples": num_samples,
        "seed_blocks": blocks,
    }
    if blocks > 1:
        report["blocks"] = per_block
    return report


def _accumulate(
    data: dict[str, np.ndarray],
    spec: DrawSpec,
    num_samples: int,
    extractor: nn.Module,
    device: torch.device | str,
    moments: list[FeatureMoments],
    kid_sample: list[list[Tensor]],
) -> None:
    """Add one chunk's features to its blocks' moments and KID samples (computing them
    from the chunk's images, in the draw's batches, when it was drawn without them)."""
    features = data.get("features")
    if features is None:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
        pixels = images.float() / 127.5 - 1
        batch = spec.batch_size or len(pixels)
        features = extract_features(extractor, pixels, batch, device).numpy()
    block_of = data["indices"] // num_samples  # [n]
    for block in np.unique(block_of):
        rows = torch.from_numpy(features[block_of == block])  # [m, D]
        moments[block].update(rows)
        kept = sum(len(x) for x in kid_sample[block])
        if kept < KID_MAX_REAL:
            kid_sample[block].append(rows[: KID_MAX_REAL - kept].float())


def first_samples(spec: DrawSpec, n: int) -> Tensor:
    """The draw's samples of indices [0, n) as images [n, C, H, W] in [-1, 1], read back
    from the chunks (in index order) until n are gathered."""
    out, kept = [], 0
    for data in iter_chunks(spec.out, spec.total, spec.chunk_size):
        images = torch.from_numpy(data["images"][data["indices"] < n])  # [m, H, W, C]
        out.append(images.permute(0, 3, 1, 2).float() / 127.5 - 1)  # NHWC -> NCHW
        kept += len(images)
        if kept >= n:
            break
    return torch.cat(out)


def equal_n_line(report: dict[str, Any], extractor_name: str) -> str:
    """The console line of ``heldout_report``: each figure beside its floor."""
    floor = report.get("floor") or {}

    def pair(key: str, fmt: str) -> str:
        value, base = report.get(key), floor.get(key)
        text = "n/a" if value is None else format(value, fmt)
        return text + (f" (floor {format(base, fmt)})" if base is not None else "")

    return (
        f"at equal n={report['n']} against the {report['reference_split']} split "
        f"({extractor_name} features): fid={pair('fid', '.3f')} "
        f"precision={pair('precision', '.3f')} recall={pair('recall', '.3f')} "
        f"memorisation={pair('memorisation', '.3f')}"
        + (f"; {report['why']}" if report.get("why") else "")
    )


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
