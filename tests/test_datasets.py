"""Every data set through the real loading code, on files fabricated in the real formats."""

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ddpm.data.datamodule import ImageDataModule
from ddpm.runs.cli import train
from tests.conftest import ROOT, TINY, call_entry, compose_train
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


def test_cifar10_preset_trains_on_every_training_image(tmp_path):
    """Ho et al. train on all 50,000 training images and measure FID against them: the
    preset holds nothing out and validates on a fixed 1,000 of them (here all 50)."""
    images = write_cifar10(tmp_path)
    cfg = compose_train(["experiment=cifar10_ddpm", f"paths.data_dir={tmp_path}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert (cfg.data.val_fraction, cfg.data.val_size) == (0, 1000)
    assert dm.train_set.images.shape[0] == images.shape[0] == 50
    assert dm.split_images("train").shape[0] == dm.split_images("all").shape[0] == 50
    assert dm.val_set.images.shape[0] == 50  # min(val_size, N)
    assert cfg.eval.reference_split == "train"
    assert cfg.model.init == "ho"  # Ho et al.'s initialisation; the digits default keeps torch's
    assert compose_train([]).model.init == "torch"


def test_folder_with_class_subfolders_resizes_and_crops(tmp_path):
    write_folder(tmp_path, corrupt=False)
    dm = ImageDataModule(
        name="folder", root=str(tmp_path), image_size=16, channels=3, val_fraction=0.25
    )
    dm.setup("fit")
    assert dm.train_set.images.shape[1:] == (3, 16, 16)
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6


def test_loose_images_beside_class_subfolders(tmp_path):
    """Images directly under root next to class subfolders have no class: such a folder
    is unlabelled (every label 0, not the loose ones sharing the first class's), and a
    class-conditional run refuses it in one line."""
    write_folder(tmp_path, corrupt=False)
    pixels = np.random.default_rng(1).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    for name in ("loose_a.png", "loose_b.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    dm = ImageDataModule(name="folder", root=str(tmp_path), image_size=16, channels=3)
    dm.setup("fit")
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert labels.tolist() == [0] * 14 and dm.num_classes == 1
    dm = ImageDataModule(
        name="folder", root=str(tmp_path), image_size=16, channels=3, conditional=True
    )
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    assert str(info.value) == (
        f"data.conditional=true takes each image's class from its subfolder, but {tmp_path} "
        "also has 2 images directly under it (loose_a.png, ...): move them into a class "
        "subfolder, or train with data.conditional=false"
    )


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


@pytest.mark.parametrize("experiment", ["mnist", "fashion_mnist", "cifar10_ddpm", "cifar10_edm"])
def test_experiment_presets_run_two_training_steps(tmp_path, experiment):
    data_dir = tmp_path / "data"
    if experiment.startswith("cifar10"):
        write_cifar10(data_dir)
    else:
        write_mnist(data_dir, "MNIST" if experiment == "mnist" else "FashionMNIST")
    overrides = [o for o in TINY if not o.startswith(("model.", "data.", "schedule."))]
    if experiment.startswith("cifar10"):
        # the preset's net as the docs state it (Ho et al.'s 35.7M, EDM's widths 53.6M),
        # built but trained here at a quarter of the width, one block per level (seconds)
        cfg = compose_train([f"experiment={experiment}"], tmp_path / "full")
        net = instantiate(cfg.model, augment_dim=7 if experiment == "cifar10_edm" else 0)
        millions = round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
        assert millions == {"cifar10_ddpm": 35.7, "cifar10_edm": 53.6}[experiment]
        overrides += ["model.base_channels=32", "model.num_res_blocks=1"]
    cfg = compose_train(
        [
            f"experiment={experiment}",
            *overrides,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.batch_size=4",
            *(["data.global_batch_size=4"] if experiment.startswith("cifar10") else []),
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
    if experiment == "cifar10_ddpm":
        _run_the_documented_fid50k_command(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path)


def _run_the_documented_fid50k_command(ckpt: Path, tmp_path: Path) -> None:
    """docs/evaluation.md's FID-50k command, as written there, on the preset's checkpoint:
    only the sample count and the extractor (Inception needs a download) are shrunk."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text.split("## Ho et al.'s protocol")[1]
    command = section.split("```bash")[1].split("```")[0].replace("\\\n", " ")
    line = next(row for row in command.splitlines() if "sample.py" in row)
    args = shlex.split(line.split("sample.py", 1)[1])
    assert {"num_samples=50000", "sampler=ddpm", "sampler.steps=null"} <= set(args)
    assert {"sampler.variance=fixed_large", "feature_extractor=inception"} <= set(args)
    assert {"evaluate=true", "reference_split=train", "seed_blocks=3", "devices=8"} <= set(args)
    shrunk = {"num_samples": "4", "batch_size": "4", "feature_extractor": "digits"}
    shrunk |= {"devices": "1", "accelerator": "cpu", "chunk_size": "5"}
    shrunk |= {"ckpt_path": str(ckpt), "out_dir": str(tmp_path / "fid50k")}
    args = [f"{k}={shrunk.get(k, v)}" for k, v in (a.split("=", 1) for a in args)]
    result = call_entry("sample.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "fid50k" / "metrics.json").read_text())
    sampler = metrics["sampler"]
    assert sampler["name"] == "DDPMSampler" and sampler["variance"] == "fixed_large"
    assert sampler["steps"] is None  # every one of the T timesteps
    assert metrics["reference"] == {**metrics["reference"], "split": "train", "num_images": 50}
    blocks = [b["indices"] for b in metrics["blocks"]]
    assert blocks == [[0, 4], [4, 8], [8, 12]] and metrics["fid_std"] > 0
    assert metrics["fid"] == pytest.approx(np.mean([b["fid"] for b in metrics["blocks"]]))
    assert metrics["wall_seconds"] > 0
