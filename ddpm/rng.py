"""Per-sample random streams: what makes an image depend on (seed, index) only."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so (seed, index)
# is folded into 32 bits: index + seed * golden ratio (streams of two seeds are 2.6e9
# indices apart), then scrambled by MurmurHash3's finaliser. The finaliser is a bijection
# on 32-bit integers, so distinct indices of one seed never share a stream.
_GOLDEN = 0x9E3779B9
_MASK = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    """MurmurHash3 fmix32: a bijective 32-bit mixer (Appleby 2011)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def index_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for sample ``index`` of the stream ``seed`` (both >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and sample index={index} must be >= 0")
    return torch.Generator().manual_seed(_fmix32((index + seed * _GOLDEN) & _MASK))


def sample_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One generator per sample index: sample i of seed s is the same image whatever
    batch or process draws it."""
    return [index_generator(seed, int(i)) for i in indices]
