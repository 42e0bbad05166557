"""Per-sample random streams: what makes an image depend on (seed, index) only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so (seed, index)
# is folded into 32 bits: index + seed * golden ratio (streams of two seeds are 2.6e9
# indices apart), then scrambled by MurmurHash3's finaliser. The finaliser is a bijection
# on 32-bit integers, so distinct indices of one seed never share a stream.
_GOLDEN = 0x9E3779B9
_MASK = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF

Generators = torch.Generator | Sequence[torch.Generator] | None


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


def step_seed(seed: int, step: int, rank: int = 0, micro_batch: int = 0) -> int:
    """The seed of training step ``step`` on process ``rank`` (63 bits).

    Training reseeds the global generators from this before every batch, so the noise,
    timesteps, flips and dropout of a step depend on (seed, step, rank) only: a resumed run
    draws exactly what the uninterrupted run drew, and every DDP rank draws its own.
    """
    h = (seed & _MASK64) ^ ((step + 1) * 0x9E3779B97F4A7C15) ^ (rank * 0xBF58476D1CE4E5B9)
    h ^= micro_batch * 0x94D049BB133111EB
    return _splitmix64(h & _MASK64) >> 1


def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective 64-bit mixer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str | None = None
) -> Tensor:
    """Standard normal noise of ``shape``, drawn from ``generator``.

    A list of generators (one per sample along dim 0) makes every sample's noise
    independent of the batch it is drawn in: the same seeds give the same images whatever
    the batch size. Noise is drawn on the generator's device, then moved to ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    # one [*shape[1:]] draw per generator -> [B, *shape[1:]]
    per_sample = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.stack(per_sample).to(device)
