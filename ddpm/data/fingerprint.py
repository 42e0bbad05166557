"""Content fingerprints of a data split, for caches keyed by what the data is (FID
reference statistics), not by what it is called."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor


def tensor_fingerprint(images: Tensor) -> str:
    """Digest of decoded uint8 images [N, C, H, W]: their shape and every byte."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(images.shape), str(images.dtype))).encode())
    digest.update(images.contiguous().cpu().view(torch.uint8).numpy())  # buffer, no copy
    return digest.hexdigest()


def files_fingerprint(files: list[Path]) -> str:
    """Digest of image files by path, size and modification time: what decoding would
    read, without decoding (the streaming mode keeps no decoded copy)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def combine(*parts: object) -> str:
    """One short digest of several identifying parts."""
    return hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).hexdigest()
