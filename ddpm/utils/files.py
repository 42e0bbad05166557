"""Files that are never half-written, and the folder ddpm caches things in.

``atomic_torch_save`` writes to a temporary file in the target's own directory, fsyncs it
and renames it over the target: a process killed mid-write leaves the previous file whole
(rename is atomic on POSIX file systems), and concurrent ranks never read half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

TMP_PREFIX = ".tmp-"  # partial writes: ignored when looking for checkpoints, swept on resume


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write that becomes ``path`` only when the block ends without an
    error (a temporary file in the same folder, fsynced, then renamed over ``path``); on
    an error, or if the process is killed, ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; these are normal files
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)  # ... and the rename itself survives a power cut


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system allows opening a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_partial_files(directory: Path) -> list[Path]:
    """Remove the temporary files of writes that were killed; returns what was removed."""
    removed = []
    for stale in Path(directory).glob(f"{TMP_PREFIX}*.part"):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed.append(stale)
    return removed


def cache_dir() -> Path:
    """Where ddpm caches feature nets and real-data statistics: ``$DDPM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ddpm``, else ``~/.cache/ddpm``."""
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ddpm"
