"""The training batch order and the per-step seeds that make resumes exact."""

from __future__ import annotations

import itertools

import pytest

from ddpm.data.batches import StepBatchSampler
from ddpm.diffusion.rng import step_seed


def _take(sampler: StepBatchSampler, n: int) -> list[list[int]]:
    """The next n batches a run at sampler.position() sees, across epochs."""
    out: list[list[int]] = []
    consumed = sampler.position()
    while len(out) < n:
        pos = consumed + len(out)
        sampler.position = lambda pos=pos: pos
        out += list(itertools.islice(iter(sampler), n - len(out)))
    return out


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = StepBatchSampler(100, 10, seed=3)
    assert len(sampler) == 10
    epoch0 = [i for b in sampler for i in b]
    assert sorted(epoch0) == list(range(100))
    sampler.position = lambda: 10
    epoch1 = [i for b in sampler for i in b]
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    assert [i for b in StepBatchSampler(100, 10, seed=4) for i in b] != epoch0


@pytest.mark.parametrize("resume_at", [0, 3, 10, 17])
def test_a_run_resumed_at_any_step_sees_the_same_batches(resume_at):
    straight = _take(StepBatchSampler(95, 8, seed=1), 30)
    resumed = _take(StepBatchSampler(95, 8, seed=1, position=lambda: resume_at), 30 - resume_at)
    assert resumed == straight[resume_at:]
    assert all(len(b) == 8 for b in straight)  # drop_last: 11 full batches per epoch


def test_ranks_split_every_epoch_without_overlap():
    ranks = [StepBatchSampler(64, 4, seed=0, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in ranks} == {4}
    shares = [[i for b in s for i in b] for s in ranks]
    assert sorted(i for share in shares for i in share) == list(range(64))


def test_uneven_split_pads_like_distributed_sampler():
    ranks = [StepBatchSampler(10, 2, seed=0, rank=r, world_size=3) for r in range(3)]
    seen = [i for s in ranks for b in s for i in b]
    assert len(seen) == 12 and set(seen) == set(range(10))


def test_step_seeds_differ_by_step_rank_and_micro_batch_and_repeat():
    seeds = {
        step_seed(42, step, rank, micro)
        for step, rank, micro in itertools.product(range(50), range(4), range(2))
    }
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(42, 7, 1) == step_seed(42, 7, 1) != step_seed(43, 7, 1)
