"""Image folders decoded once per machine: a uint8 array file in the cache, memory-mapped.

``decoded_images`` decodes every file into ``$DDPM_CACHE_DIR/decoded/<key>/images.npy``
(written in place, image by image, with a progress bar: memory stays at one image), under
a file lock, so one process of a machine decodes and the others (DDP ranks, a restart, a
resume) map the same file: the page cache holds one copy whatever the rank count. The key
is what the pixels depend on: the files (paths, sizes, modification times), the size, the
channels and whether bad files are skipped. ``verified_files`` caches the streaming mode's
header check the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.data.datasets import bad_file, decode_image, keep_readable, verify_image
from ddpm.data.fingerprint import combine, files_fingerprint
from ddpm.utils.files import cache_dir

log = logging.getLogger(__name__)
VERSION = 1  # bump when decoding changes pixels: older caches are not read


def available_memory() -> int:
    """Bytes this machine can still hold without swapping (MemAvailable on Linux, else the
    physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(count: int, image_size: int, channels: int) -> None:
    """Refuse in-memory mode, in one line, for a set larger than the memory available."""
    need, have = count * channels * image_size * image_size, available_memory()
    if need > have:
        raise ValueError(
            f"data.in_memory=true would hold {need / 1e9:.1f} GB of decoded images "
            f"({count} x {channels}x{image_size}x{image_size}), more than the "
            f"{have / 1e9:.1f} GB of memory available: stream them with "
            "data.in_memory=false, or write shards (python -m ddpm.data.shards SRC DST, "
            "then data=shards data.root=DST)"
        )


def _folder(kind: str, files: list[Path], *parts: object) -> Path:
    key = combine(kind, VERSION, files_fingerprint(files), *parts)
    return cache_dir() / kind / key


def decoded_images(
    files: list[Path], labels: Tensor, image_size: int, channels: int, skip_bad_files: bool
) -> tuple[Tensor, Tensor, str]:
    """uint8 images [N, C, S, S] (memory-mapped, read-only in use), their labels [N] and
    the cache key (which identifies the pixels), decoded once per machine; unreadable
    files stop with their path, or are skipped."""
    folder = _folder("decoded", files, image_size, channels, skip_bad_files)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "labels.npy").is_file():
            check_fits_in_memory(len(files), image_size, channels)
            _decode_into(folder, files, labels, image_size, channels, skip_bad_files)
    # copy-on-write mapping: a writable tensor for torch, pages shared until written
    images = np.load(folder / "images.npy", mmap_mode="c")
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    return torch.from_numpy(images), labels, folder.name


def _decode_into(
    folder: Path,
    files: list[Path],
    labels: Tensor,
    image_size: int,
    channels: int,
    skip_bad_files: bool,
) -> None:
    """Decode into a temporary folder beside ``folder``, then rename it: whole or absent."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shape = (len(files), channels, image_size, image_size)
    images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
    kept, bad = [], []
    progress = tqdm(files, desc=f"decoding {len(files)} images once", unit="img")
    for i, path in enumerate(progress):
        try:
            images[len(kept)] = decode_image(path, image_size, channels).numpy()  # compacted
            kept.append(i)
        except (OSError, ValueError, SyntaxError) as exc:
            if not skip_bad_files:
                shutil.rmtree(tmp, ignore_errors=True)
                raise bad_file(path, exc) from exc
            bad.append(path)
    if bad:
        log.warning("skipped %d unreadable image file(s), e.g. %s", len(bad), bad[0])
    if not kept:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError("no readable images left after skipping bad files")
    images.flush()
    if bad:  # the readable ones only: copied in blocks into an array of their count
        kept_shape = (len(kept), *shape[1:])
        out = np.lib.format.open_memmap(tmp / "kept.npy", "w+", np.uint8, kept_shape)
        for start in range(0, len(kept), 1024):
            out[start : start + 1024] = images[start : min(start + 1024, len(kept))]
        out.flush()
        del out
        (tmp / "kept.npy").replace(tmp / "images.npy")
    del images
    np.save(tmp / "labels.npy", labels.numpy()[kept])
    (tmp / "files.json").write_text(json.dumps([str(files[i]) for i in kept]))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def verified_files(
    files: list[Path], labels: Tensor, skip_bad_files: bool
) -> tuple[list[Path], Tensor]:
    """The files whose headers read (the streaming mode's check at setup), checked once per
    machine and cached: the other ranks, restarts and resumes read the result."""
    folder = _folder("verified", files, skip_bad_files)
    folder.parent.mkdir(parents=True, exist_ok=True)
    record = folder.with_suffix(".json")
    with FileLock(str(folder) + ".lock"):
        if not record.is_file():
            kept, _ = keep_readable(files, verify_image, skip_bad_files)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(kept))
            tmp.replace(record)
        kept = json.loads(record.read_text())
    return [files[i] for i in kept], labels[kept]
