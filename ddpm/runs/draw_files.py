"""The files of a draw (``sample.py``) and how an interrupted one is found again.

``OUT/draw.json`` names the draw (checkpoint, seed, sampler, sizes): a rerun with the same
values continues it, other values are refused. Samples go to ``OUT/chunks/chunk-K.npz``
as they finish: chunk K holds the indices ``[K * chunk_size, (K + 1) * chunk_size)`` (fewer
in the last), with ``images`` uint8 [n, H, W, C], ``indices``, ``labels`` (conditional
checkpoints) and ``features`` (``evaluate=true``). Each chunk is written whole or not at
all, after its PNGs, so a chunk file on disk is a finished chunk. At the end the chunks are
streamed into one ``OUT/samples.npz`` without holding them all in memory.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.runs.errors import UsageError
from ddpm.utils.files import atomic_open, sweep_partial_files

MANIFEST = "draw.json"
CHUNKS = "chunks"


def chunk_range(chunk: int, chunk_size: int, total: int) -> range:
    """The sample indices of ``chunk``."""
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, total))


def num_chunks(total: int, chunk_size: int) -> int:
    return math.ceil(total / chunk_size)


def chunk_path(out: Path, chunk: int) -> Path:
    return out / CHUNKS / f"chunk-{chunk:06d}.npz"


def png_name(index: int, total: int) -> str:
    """``00012.png``: five digits, more when the draw needs them."""
    return f"{index:0{max(5, len(str(total - 1)))}d}.png"


def check_manifest(out: Path, identity: dict[str, Any]) -> None:
    """Refuse an ``out_dir`` that holds another draw (values differ from ``identity``)."""
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path} is unreadable ({exc}): remove it or pick another out_dir"
        ) from exc
    differ = [k for k in identity if stored.get(k) != identity[k]]
    if differ:
        key = differ[0]
        raise UsageError(
            f"out_dir={out} holds another draw ({key}={stored.get(key)!r} there, "
            f"{identity[key]!r} here): pick another out_dir, or rerun with its values to "
            "finish it"
        )


def write_manifest(out: Path, identity: dict[str, Any]) -> None:
    write_atomic(out / MANIFEST, json.dumps(identity, indent=2, default=str).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_open(path) as f:
        f.write(data)


def save_chunk(out: Path, chunk: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one finished chunk, whole or not at all."""
    with atomic_open(chunk_path(out, chunk)) as f:
        np.savez(f, **arrays)


def load_chunk(out: Path, chunk: int) -> dict[str, np.ndarray]:
    with np.load(chunk_path(out, chunk), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def finished_chunks(
    out: Path, total: int, chunk_size: int, image_shape: tuple[int, ...]
) -> tuple[list[int], list[str]]:
    """The chunks already on disk that are whole and hold what this draw expects, and a
    note for each one that does not (it is drawn again). Leftover partial writes go."""
    folder = out / CHUNKS
    if not folder.is_dir():
        return [], []
    sweep_partial_files(folder)
    good, notes = [], []
    for chunk in range(num_chunks(total, chunk_size)):
        path = chunk_path(out, chunk)
        if not path.is_file():
            continue
        expected = np.arange(chunk * chunk_size, min((chunk + 1) * chunk_size, total))
        try:
            data = load_chunk(out, chunk)
            images, indices = data["images"], data["indices"]
            ok = (
                images.dtype == np.uint8
                and images.shape == (len(expected), *image_shape)
                and np.array_equal(indices, expected)
            )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            ok, reason = False, f"unreadable ({type(exc).__name__})"
        else:
            reason = "not the expected indices or image shape"
        if ok:
            good.append(chunk)
        else:
            notes.append(f"{path.name} is {reason}: drawing it again")
            path.unlink(missing_ok=True)
    return good, notes


def iter_chunks(out: Path, total: int, chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The finished chunks in index order, one at a time."""
    for chunk in range(num_chunks(total, chunk_size)):
        yield load_chunk(out, chunk)


def merge_samples(out: Path, total: int, chunk_size: int, image_shape: tuple[int, ...]) -> Path:
    """Stream the chunks into ``OUT/samples.npz`` (compressed, like ``np.savez_compressed``):
    ``images`` uint8 [total, H, W, C] and, for conditional draws, ``labels`` [total]; one
    chunk in memory at a time."""
    path = out / "samples.npz"
    first = load_chunk(out, 0)
    members = {"images": (first["images"].dtype, (total, *image_shape))}
    if "labels" in first:
        members["labels"] = (first["labels"].dtype, (total,))
    with (
        atomic_open(path) as f,
        zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive,
    ):
        for key, (dtype, shape) in members.items():
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            }
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for data in iter_chunks(out, total, chunk_size):
                    member.write(np.ascontiguousarray(data[key], dtype=dtype).tobytes())
    return path
