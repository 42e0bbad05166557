"""Data at scale: shards written and read (python -m ddpm.data.shards, data=shards), exact
resume on shards under 2-process gloo DDP with loader workers, the decode-once cache,
FID statistics streamed in bounded memory, and the global batch of a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import decoded as decoded_module
from ddpm.data.batches import StepBatchSampler
from ddpm.data.datamodule import ImageDataModule
from ddpm.data.shards import MANIFEST, read_manifest
from ddpm.evaluation.features import extract_features, load_digits_feature_net
from ddpm.evaluation.reference import streamed_stats
from ddpm.evaluation.stats_file import ReferenceStats
from ddpm.runs.errors import UsageError
from ddpm.runs.prepare import prepare
from tests.conftest import TINY, call_entry, compose_train, run_entry
from tests.test_resume import _load, _max_diff


def _folder(root: Path, per_class: int = 32, size: int = 12) -> Path:
    """Two class subfolders of small PNGs (a tiny image folder in the real format)."""
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size + 2, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image folder, its shards), written once by the command line, small chunks."""
    work = tmp_path_factory.mktemp("shards")
    folder, out = _folder(work / "images"), work / "shards"
    result = call_entry(
        "ddpm.data.shards", str(folder), str(out), "--chunk-bytes", "2KB", "--workers", "1",
        cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 64 images in" in result.stdout and "data=shards data.root=" in result.stdout
    return folder, out


def _module(name: str, root: Path, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(name=name, root=str(root), image_size=8, channels=3, **kwargs)
    dm.setup("fit")
    return dm


def test_shards_hold_the_folder_and_read_back_the_same_images(shards):
    folder, out = shards
    manifest = read_manifest(str(out))
    assert manifest["num_items"] == 64 and len(manifest["chunk_sizes"]) > 4
    assert sum(manifest["chunk_sizes"]) == 64 and manifest["num_classes"] == 2
    memory, streamed = _module("folder", folder), _module("shards", out, in_memory=False)
    for split in ("train", "val"):
        assert torch.equal(memory.split_images(split), streamed.split_images(split))
        assert torch.equal(memory.split_labels(split), streamed.split_labels(split))
    batches = list(streamed.split_batches("all", batch_size=10))
    assert [b.dtype for b in batches] == [torch.uint8] * 7 and sum(map(len, batches)) == 64
    assert streamed.split_fingerprint("train") != memory.split_fingerprint("train")


def test_shards_refuse_bad_places_and_other_versions_in_one_line(shards, tmp_path):
    folder, out = shards
    again = call_entry("ddpm.data.shards", str(folder), str(out), cwd=tmp_path)
    assert again.returncode == 2  # written shards are never overwritten
    assert again.stderr.strip() == f"error: {out} is not empty: write the shards to a new folder"
    with pytest.raises(FileNotFoundError, match=r"no readable shards at data.root=.*nowhere"):
        _module("shards", tmp_path / "nowhere", in_memory=False)
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((out / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 0}))
    with pytest.raises(ValueError) as info:
        _module("shards", old, in_memory=False)
    assert str(info.value) == (
        f"the shards at {old} are ddpm-shards version 0, and this ddpm reads ddpm-shards "
        "version 1: write them again with python -m ddpm.data.shards SRC DST"
    )
    with pytest.raises(ValueError, match="data=shards streams its images"):
        _module("shards", out, in_memory=True)


def test_a_named_data_set_becomes_shards(tmp_path):
    result = call_entry("ddpm.data.shards", "digits", str(tmp_path / "d"), "--workers", "1",
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    digits = ImageDataModule(name="digits")
    streamed = ImageDataModule(name="shards", root=str(tmp_path / "d"), image_size=8,
                               channels=1, in_memory=False)  # fmt: skip
    assert torch.equal(digits.split_images("val"), streamed.split_images("val"))


def test_chunk_grouped_order_is_a_permutation_per_epoch_and_each_rank_reads_its_chunks():
    groups = torch.arange(100) // 10  # 10 chunks of 10 items
    for world in (1, 2):
        seen = []
        for rank in range(world):
            sampler = StepBatchSampler(100, 5, seed=3, rank=rank, world_size=world,
                                       groups=groups, window=2)  # fmt: skip
            items = sampler.epoch_indices(0)
            assert items == StepBatchSampler(100, 5, seed=3, rank=rank, world_size=world,
                                             groups=groups, window=2).epoch_indices(0)  # fmt: skip
            if world == 2:  # 50 items: 2.5 windows of 2 chunks, not all 10 chunks
                assert len({int(groups[i]) for i in items}) <= 6
            seen += items
        assert sorted(seen) == list(range(100))
    other = StepBatchSampler(100, 5, seed=3, groups=groups, window=2).epoch_indices(1)
    assert other != StepBatchSampler(100, 5, seed=3, groups=groups, window=2).epoch_indices(0)


def test_ddp_with_workers_on_shards_resumes_exactly_and_sees_every_image_once(shards, tmp_path):
    """2 gloo processes, 2 loader workers each, 48 training images at 4 per device: one
    epoch is 6 steps. 6 straight == 3, resume=, 3 more (weights, EMA, optimizer, and the
    batches of every step on every rank); the epoch shows each image exactly once."""
    _, out = shards
    common = [*TINY, "data=shards", f"data.root={out}", "data.image_size=8",
              "data.val_fraction=0.25", "data.num_workers=2", "data.batch_size=4",
              "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.deterministic=true", "trainer.val_check_interval=3", "eval=null",
              "logger=none", "seed=5",
              "+callbacks.batches._target_=tests.faults.BatchLog"]  # fmt: skip
    runs = {}
    for name, steps in (("straight", 6), ("split", 3)):
        run = tmp_path / name
        result = run_entry("train.py", *common, f"trainer.max_steps={steps}",
                           f"+callbacks.batches.out_dir={tmp_path / name}-batches",
                           f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run
    resumed = run_entry("train.py", f"resume={runs['split']}", "trainer.max_steps=6",
                        cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (_load(runs[n] / "checkpoints" / "last.ckpt") for n in ("straight", "split"))
    for key in ("state_dict", "current_model_state", "optimizer_states"):
        assert _max_diff(a[key], b[key]) <= 1e-6, key
    logs = {n: [torch.load(tmp_path / f"{n}-batches" / f"rank{r}.pt") for r in (0, 1)]
            for n in ("straight", "split")}  # fmt: skip
    assert logs["straight"] == logs["split"]  # the same batches, step by step
    epoch = [i for rank in logs["straight"] for step in range(6) for i in rank[step]]
    assert sorted(epoch) == list(range(48))
    assert (
        "batch: 4 per device x 2 devices x 1 nodes x 1 accumulation = 8 global"
        in (runs["straight"] / "train.log").read_text()
    )


def test_folders_decode_once_per_machine_into_a_shared_cache(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "images", per_class=5)
    first = _module("folder", folder)
    assert type(first.train_set).__name__ == "MappedImages"
    entries = sorted(p.name for p in (Path(decoded_module.cache_dir()) / "decoded").iterdir())

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decoded_module, "decode_image", no_decoding)
    second = _module("folder", folder)  # another rank, a restart, a resume: the same file
    assert torch.equal(first.train_set.images, second.train_set.images)
    assert (
        sorted(p.name for p in (Path(decoded_module.cache_dir()) / "decoded").iterdir()) == entries
    )
    (folder / "cats" / "000.png").write_bytes((folder / "dogs" / "001.png").read_bytes())
    monkeypatch.undo()  # a changed file: another key, decoded anew
    third = _module("folder", folder)
    assert not torch.equal(first.split_images("all"), third.split_images("all"))


def test_in_memory_mode_refuses_a_set_larger_than_memory(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "images", per_class=2)
    monkeypatch.setattr(decoded_module, "available_memory", lambda: 100)
    with pytest.raises(ValueError) as info:
        _module("folder", folder)
    message = str(info.value)
    assert message.startswith("data.in_memory=true would hold 0.0 GB of decoded images (4 x")
    assert "data.in_memory=false" in message and "python -m ddpm.data.shards" in message


def test_streamed_statistics_equal_the_in_memory_ones():
    digits = ImageDataModule(name="digits")
    net = load_digits_feature_net()
    whole = ReferenceStats.from_features(extract_features(net, digits.split_images("train")))
    count = digits.split_size("train")
    streamed = streamed_stats(digits.split_batches("train", batch_size=100), count, net)
    assert np.allclose(streamed.mu, whole.mu, rtol=0, atol=1e-9)
    assert np.allclose(streamed.sigma, whole.sigma, rtol=0, atol=1e-9)
    assert torch.allclose(streamed.kid_features, whole.kid_features, atol=1e-6)
    assert streamed.num_images == whole.num_images == 1617


def test_a_recipes_global_batch_is_split_over_the_devices_or_refused(tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "eval=null", "logger=none"]
    cfg = compose_train([*TINY, *ddp, "trainer.devices=2", "data.global_batch_size=64"],
                        tmp_path / "a")  # fmt: skip
    prepared = prepare(cfg)
    assert prepared.datamodule.batch_size == 32 and prepared.cfg.data.batch_size == 32
    assert prepared.batch_line == (
        "batch: 32 per device x 2 devices x 1 nodes x 1 accumulation = 64 global"
    )
    cfg = compose_train([*TINY, *ddp, "trainer.devices=3", "data.global_batch_size=64"],
                        tmp_path / "b")  # fmt: skip
    with pytest.raises(UsageError, match=r"data.global_batch_size=64 does not divide into 3 "):
        prepare(cfg)
    for preset, batch in (("cifar10_ddpm", 128), ("cifar10_edm", 512)):
        assert compose_train([f"experiment={preset}"]).data.global_batch_size == batch
