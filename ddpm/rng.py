"""Per-sample random streams: what makes an image depend on (seed, index) only."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so (seed, index)
# is folded into 32 bits: distinct indices of one seed never share a stream, and the
# streams of two seeds are 2.6e9 indices apart (golden-ratio multiplier).
_GOLDEN = 0x9E3779B9


def index_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for sample ``index`` of the stream ``seed`` (both >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and sample index={index} must be >= 0")
    return torch.Generator().manual_seed((index + seed * _GOLDEN) & 0xFFFFFFFF)


def sample_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One generator per sample index: sample i of seed s is the same image whatever
    batch or process draws it."""
    return [index_generator(seed, int(i)) for i in indices]
