"""Every data set through the real loading code, on files fabricated in the real formats."""

import csv

import numpy as np
import pytest
import torch

from ddpm.data.datamodule import ImageDataModule
from ddpm.runs.cli import train
from tests.conftest import TINY, compose_train
from tests.fabricate import write_cifar10, write_folder, write_mnist


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_idx_files_load_as_uint8_with_labels(tmp_path, name, folder):
    images = write_mnist(tmp_path, folder)
    dm = ImageDataModule(
        name=name, root=str(tmp_path), image_size=28, channels=1, val_fraction=0.25
    )
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    x, _, _ = dm.train_set[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28)
    everything = torch.cat([dm.train_set.images, dm.val_set.images])
    assert sorted(everything.flatten().tolist()) == sorted(images.flatten().tolist())
    assert dm.split_images("train").min() >= -1 and dm.split_images("train").max() <= 1


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_files_say_what_where_and_how_to_fetch(tmp_path, name):
    dm = ImageDataModule(
        name=name, root=str(tmp_path), image_size=32, channels=3 if name == "cifar10" else 1
    )
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert (
        str(tmp_path) in message and f"data={name}" in message and "data.download=true" in message
    )


def test_cifar10_pickled_batches_load(tmp_path):
    images = write_cifar10(tmp_path)
    dm = ImageDataModule(
        name="cifar10", root=str(tmp_path), image_size=32, channels=3, val_fraction=0.2
    )
    dm.setup("fit")
    assert dm.train_set.images.shape == (40, 3, 32, 32)
    all_images = torch.cat([dm.train_set.images, dm.val_set.images])
    assert sorted(all_images.reshape(50, -1).sum(1).tolist()) == sorted(
        images.reshape(50, -1).sum(1).astype(int).tolist()
    )


def test_folder_with_class_subfolders_resizes_and_crops(tmp_path):
    write_folder(tmp_path, corrupt=False)
    dm = ImageDataModule(
        name="folder", root=str(tmp_path), image_size=16, channels=3, val_fraction=0.25
    )
    dm.setup("fit")
    assert dm.train_set.images.shape[1:] == (3, 16, 16)
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6


def test_a_corrupt_file_stops_setup_naming_it(tmp_path):
    bad = write_folder(tmp_path)
    for in_memory in (True, False):
        dm = ImageDataModule(
            name="folder", root=str(tmp_path), image_size=16, channels=3, in_memory=in_memory
        )
        with pytest.raises(ValueError, match=r"data\.skip_bad_files=true") as err:
            dm.setup("fit")
        assert str(bad) in str(err.value)


def test_skip_bad_files_skips_and_logs(tmp_path, caplog):
    write_folder(tmp_path)
    for in_memory in (True, False):
        dm = ImageDataModule(
            name="folder",
            root=str(tmp_path),
            image_size=16,
            channels=3,
            in_memory=in_memory,
            skip_bad_files=True,
            val_fraction=0.25,
        )
        with caplog.at_level("WARNING"):
            dm.setup("fit")
        assert len(dm.train_set) + len(dm.val_set) == 12
        assert "skipped 1 unreadable image file" in caplog.text


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    dm = ImageDataModule(name="folder", root=str(tmp_path / "empty"), image_size=16, channels=3)
    with pytest.raises(ValueError, match="holds no"):
        dm.setup("fit")


def test_in_memory_and_streaming_give_the_same_tensors(tmp_path):
    write_folder(tmp_path, corrupt=False)
    kwargs = {"name": "folder", "root": str(tmp_path), "image_size": 16, "channels": 3}
    memory, stream = (
        ImageDataModule(**kwargs, in_memory=True),
        ImageDataModule(**kwargs, in_memory=False),
    )
    for split in ("train", "val"):
        assert torch.equal(memory.split_images(split), stream.split_images(split))
        batch_m = next(iter(memory.val_dataloader())) if split == "val" else None
        batch_s = next(iter(stream.val_dataloader())) if split == "val" else None
        if batch_m is not None:
            assert all(torch.equal(a, b) for a, b in zip(batch_m, batch_s, strict=True))


def test_flips_happen_on_the_device_while_training_only():
    dm = ImageDataModule(name="digits", hflip=True)
    dm.setup("fit")
    x = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(256, 1, 1, 1)
    batch = (x, torch.zeros(256), torch.arange(256))

    class _Trainer:
        training = True

    dm.trainer = _Trainer()
    out, _, _ = dm.on_after_batch_transfer(batch, 0)
    flipped = (out == (x.flip(-1).float() / 127.5 - 1)).flatten(1).all(1)
    assert 0.3 < flipped.float().mean() < 0.7
    dm.trainer.training = False
    out, _, _ = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(out, x.float() / 127.5 - 1)


@pytest.mark.parametrize("experiment", ["mnist", "fashion_mnist", "cifar10_ddpm"])
def test_experiment_presets_run_two_training_steps(tmp_path, experiment):
    data_dir = tmp_path / "data"
    if experiment == "cifar10_ddpm":
        write_cifar10(data_dir)
    else:
        write_mnist(data_dir, "MNIST" if experiment == "mnist" else "FashionMNIST")
    overrides = [o for o in TINY if not o.startswith(("model.", "data.batch_size", "schedule."))]
    cfg = compose_train(
        [
            f"experiment={experiment}",
            *overrides,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.batch_size=4",
            "data.val_fraction=0.1",
            f"paths.data_dir={data_dir}",
            "schedule.num_timesteps=30",
            "sampler.steps=2",  # 2-step grids: sampling the full-size nets is not tested here
            "eval.feature_extractor=digits",
            "logger=csv",
        ],
        tmp_path / "run",
    )
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
