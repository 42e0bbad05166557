"""Real-data reference statistics for FID/KID: computed once and cached as portable
``.npz`` files (``ddpm.evaluation.stats_file``), so an evaluation costs only the generated
side; or read from a file the user names (ours, pytorch-fid's, the ADM evaluator's).

The cache key is what determines the numbers: the split's images (root, channels, size
and a content fingerprint) and the feature extractor with its weights' version.

``python -m ddpm.evaluation.reference data=cifar10 split=train out=cifar10_train.npz``
writes such a file (see ``ddpm.runs.reference_cli``).
"""

from __future__ import annotations

import runpy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ddpm.data.sets import to_unit_range
from ddpm.evaluation.features import QUANTIZATION, extract_features, weights_hash
from ddpm.evaluation.stats_file import ReferenceStats
from ddpm.utils.files import cache_dir

STATS_VERSION = 4  # bump when the data pipeline changes pixels: old caches are ignored


def extractor_meta(name: str, extractor: nn.Module) -> dict[str, str]:
    """What a reference file records about the features it was made with."""
    return {
        "extractor": name,
        "extractor_hash": weights_hash(extractor),
        "resize": str(getattr(extractor, "resize", "")),
        "quantization": QUANTIZATION,
    }


def reference_stats(
    key: str,
    load_images: Callable[[], Tensor],
    extractor: nn.Module,
    device: torch.device | str = "cpu",
    meta: dict[str, str] | None = None,
) -> tuple[ReferenceStats, bool]:
    """Cached statistics for ``key``; computed (and cached) on a miss.

    Returns (stats, computed_now). ``key`` names the data set, split, extractor and image
    size; ``load_images`` is only called on a miss; ``meta`` is recorded in the file.
    """
    return cached_stats(
        key,
        lambda: ReferenceStats.from_features(
            extract_features(extractor, load_images(), device=device), **(meta or {})
        ),
    )


def cached_stats(key: str, compute: Callable[[], ReferenceStats]) -> tuple[ReferenceStats, bool]:
    """The statistics cached under ``key``, else ``compute()``'s, cached. Returns (stats,
    computed_now)."""
    path = cache_dir() / "reference" / f"{key}.npz"
    if path.is_file():
        return ReferenceStats.load(path), False
    stats = compute()
    stats.save(path)
    return stats, True


def streamed_stats(
    batches: Iterable[Tensor],
    count: int,
    extractor: nn.Module,
    device: torch.device | str = "cpu",
    meta: dict[str, str] | None = None,
) -> ReferenceStats:
    """Statistics of ``count`` images arriving as uint8 batches [B, C, H, W], extracted
    batch by batch: memory stays at one batch and the KID sample, whatever ``count`` is.
    (uint8 images are on the quantised levels already: the same features as the float
    path's.)"""
    features = (extract_features(extractor, to_unit_range(b), device=device) for b in batches)
    return ReferenceStats.from_stream(features, count, **(meta or {}))


def reference_key(
    name: str, split: str, extractor: str, extractor_version: str, images_id: str
) -> str:
    """File-name-safe cache key of one real-data reference: readable parts first, then
    ``images_id`` (a digest of the images' root, channels, size and content)."""
    return f"{name}-{split}-{extractor}-{extractor_version}-{images_id}-v{STATS_VERSION}"


def data_reference(
    datamodule: object,
    split: str,
    extractor_name: str,
    extractor: nn.Module,
    device: torch.device | str = "cpu",
) -> tuple[str, ReferenceStats]:
    """The cached statistics of ``split`` of ``datamodule`` (an ImageDataModule) under
    ``extractor``, computed on a miss; returns (cache key, stats)."""
    key = reference_key(
        datamodule.name,
        split,
        extractor_name,
        str(extractor.version),  # every extractor names its weights' version
        datamodule.split_fingerprint(split),
    )
    meta = {**extractor_meta(extractor_name, extractor), "data": datamodule.name, "split": split}
    count = datamodule.split_size(split)
    stats, _ = cached_stats(
        key, lambda: streamed_stats(datamodule.split_batches(split), count, extractor, device, meta)
    )
    return key, stats


def file_reference(
    path: Path, extractor_name: str, extractor: nn.Module, note: bool = True
) -> ReferenceStats:
    """The statistics in ``path`` (``fid_reference=FILE.npz``), refused in one line when
    they were made with another extractor, other weights or another dimension; ``note``
    prints a line when the file does not say how it was made."""
    stats = ReferenceStats.load(Path(path))
    dim = int(getattr(extractor, "num_features", stats.dim))
    stats.check_fits(extractor_name, dim, weights_hash(extractor), str(path))
    if note and "extractor" not in stats.meta:
        print(
            f"note: {path} does not say how it was made (a pytorch-fid or ADM file): scored "
            f"as {extractor_name} features; its resize may differ from {extractor.resize!r}"
        )
    return stats


if __name__ == "__main__":
    # The command line composes conf/ with Hydra, which belongs to the runs layer; run it
    # by name so that this layer imports nothing above it.
    runpy.run_module("ddpm.runs.reference_cli", run_name="__main__", alter_sys=True)
