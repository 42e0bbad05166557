"""sample.py at scale: one or two gloo processes draw the same images, a killed draw
continues where it stopped, memory does not grow with the sample count, and reference
statistics travel as .npz files (ours, pytorch-fid's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ddpm.data.datamodule import ImageDataModule
from ddpm.diffusion.samplers import DDPMSampler
from ddpm.evaluation.features import load_digits_feature_net, weights_hash
from ddpm.evaluation.metrics import evaluate_images, frechet_distance
from ddpm.evaluation.reference import file_reference
from ddpm.evaluation.stats_file import FeatureMoments, ReferenceStats
from ddpm.runs.build import load_module
from ddpm.runs.draw import ChunkWriter
from ddpm.runs.draw_files import merge_samples, save_chunk
from ddpm.runs.errors import UsageError
from ddpm.runs.sampling import draw, prepare_sample
from ddpm.utils.images import to_uint8
from tests.conftest import CONF, ROOT, call_entry

FAST = ["sampler=ddim", "sampler.steps=3", "accelerator=cpu"]


@pytest.mark.slow  # two 2-process starts and 3,200 draws (~50 s): see the test below
def test_a_killed_two_process_draw_ends_with_what_one_process_draws(tiny_run, tmp_path):
    """Two gloo processes, killed (SIGKILL, no chance to clean up) once a few chunks are
    on disk, one chunk then damaged; the same command again draws only what is missing.
    It ends with the images and FID/KID that one uninterrupted process draws (in-process,
    the path sample.py takes), bit for bit, in one folder that rank 0 alone wrote."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "two"
    args = ["sampler=ddpm", "accelerator=cpu", "num_samples=1600", "chunk_size=50",
            "batch_size=20", "evaluate=true"]  # fmt: skip
    command = [sys.executable, str(ROOT / "sample.py"), f"ckpt_path={ckpt}", f"out_dir={out}",
               *args, "devices=2"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list((out / "chunks").glob("chunk-*.npz"))) < 3 and first.poll() is None:
        assert time.monotonic() < deadline, "no chunks written"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = sorted((out / "chunks").glob("chunk-*.npz"))
    assert 3 <= len(done) < 32 and not (out / "samples.npz").exists()
    done[0].write_bytes(b"half a file")  # damaged after the fact: drawn again
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the draw in" in again.stdout
    assert f"{done[0].name} is unreadable" in again.stdout

    one = tmp_path / "one"
    cfg = _compose_sample([f"ckpt_path={ckpt}", f"out_dir={one}", *args])
    draw(cfg, prepare_sample(cfg))
    a, b = np.load(one / "samples.npz"), np.load(out / "samples.npz")
    assert a["images"].shape == (1600, 8, 8, 1) and np.array_equal(a["images"], b["images"])
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, out))
    # the same features up to float rounding: MKL's sums depend on the thread count
    # (Lightning gives each of 2 processes 1 core) and on memory alignment
    for key in ("fid", "kid_mean", "kid_std"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    assert (m1["devices"], m2["devices"]) == (1, 2) and m2["resumed_samples"] > 0
    # ... which is what the module draws, chunk by chunk
    module = load_module(ckpt)
    first_chunks = [
        to_uint8(module.sample(range(s, s + 50), seed=0, batch_size=20, sampler=DDPMSampler()))
        for s in (0, 50)
    ]
    assert np.array_equal(np.concatenate(first_chunks), a["images"][:100])
    # one folder: the files one process writes, plus Hydra's record and the logs
    files = {p.relative_to(one).as_posix() for p in one.rglob("*")}
    files2 = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert files <= files2
    assert {f.split("/")[0] for f in files2 - files} == {
        ".hydra",
        "sample.log",
        "train_ddp_process_1.log",
    }
    assert len([f for f in files if f.startswith("samples/")]) == 1600
    assert len([f for f in files if f.startswith("chunks/")]) == 32


def _peak_rss_mb(ckpt: Path, out: Path, num_samples: int, cwd: Path) -> float:
    """Peak resident memory of one sample.py process (MB), measured by its parent."""
    probe = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    command = [sys.executable, "-c", probe, sys.executable, str(ROOT / "sample.py"),
               f"ckpt_path={ckpt}", f"out_dir={out}", *FAST, f"num_samples={num_samples}",
               "chunk_size=500", "save_png=false", "evaluate=true"]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB


class _Died(RuntimeError):
    """What a process dies of, in-process: an error out of the chunk writer."""


def test_a_draw_that_died_continues_where_it_stopped(tiny_run, tmp_path, monkeypatch, capsys):
    """In-process, the path sample.py takes: a draw dies after three chunks (chunk files
    are written whole, so what a kill leaves is the same), one chunk is then damaged; the
    same command draws only what is missing and ends with the images and FID/KID of an
    uninterrupted draw, bit for bit. (Two processes killed mid-draw: the slow test above.)"""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "sampler=ddpm", "accelerator=cpu", "num_samples=60",
            "chunk_size=10", "batch_size=4", "evaluate=true"]  # fmt: skip
    one, cut = tmp_path / "one", tmp_path / "cut"
    cfg = _compose_sample([*args, f"out_dir={one}"])
    draw(cfg, prepare_sample(cfg))
    write = ChunkWriter._write

    def dies_after_three(self, chunk, count, data):
        if self.written == 30:
            raise _Died("killed")
        write(self, chunk, count, data)

    monkeypatch.setattr(ChunkWriter, "_write", dies_after_three)
    cfg = _compose_sample([*args, f"out_dir={cut}"])
    with pytest.raises(_Died):
        draw(cfg, prepare_sample(cfg))
    monkeypatch.undo()
    done = sorted((cut / "chunks").glob("chunk-*.npz"))
    assert len(done) == 3 and not (cut / "samples.npz").exists()
    done[0].write_bytes(b"half a file")
    capsys.readouterr()
    cfg = _compose_sample([*args, f"out_dir={cut}"])
    draw(cfg, prepare_sample(cfg))
    printed = capsys.readouterr().out
    assert "continuing the draw in" in printed and "20 of 60 samples are there" in printed
    assert f"{done[0].name} is unreadable" in printed
    a, b = np.load(one / "samples.npz"), np.load(cut / "samples.npz")
    assert a["images"].shape == (60, 8, 8, 1) and np.array_equal(a["images"], b["images"])
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, cut))
    for key in ("fid", "kid_mean", "kid_std"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    assert m1["resumed_samples"] == 0 and m2["resumed_samples"] == 20
    pngs = sorted(p.name for p in (cut / "samples").iterdir())
    assert pngs == [f"{i:05d}.png" for i in range(60)]


@pytest.mark.slow  # 22,000 draws in two fresh processes (~20 s); RSS needs a process each
def test_peak_memory_does_not_grow_with_the_number_of_samples(tiny_run, tmp_path):
    """2,000 and 20,000 digits samples with evaluate=true (batch_size=null, the default):
    the peaks differ by less than 64 MB (measured here: 14-27 MB, then flat to 40,000,
    allocator noise). The draw before chunking held every sample and drew them in one
    batch: 974 MB against 1,414 MB for these two counts on this checkpoint."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    small = _peak_rss_mb(ckpt, tmp_path / "small", 2_000, tmp_path)
    large = _peak_rss_mb(ckpt, tmp_path / "large", 20_000, tmp_path)
    assert np.load(tmp_path / "large" / "samples.npz")["images"].shape == (20_000, 8, 8, 1)
    assert large - small < 64, (small, large)


def test_merged_samples_stream_equals_the_chunks(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 23)
    for k, start in enumerate(range(0, 23, 5)):
        part = slice(start, min(start + 5, 23))
        save_chunk(tmp_path, k, {"images": images[part], "indices": np.arange(23)[part],
                                 "labels": labels[part]})  # fmt: skip
    merged = np.load(merge_samples(tmp_path, 23, 5, (4, 4, 3)))
    assert np.array_equal(merged["images"], images) and np.array_equal(merged["labels"], labels)


def test_streamed_moments_and_frechet_distance_match_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(700, 6, generator=g), torch.randn(500, 6, generator=g) * 1.5 + 0.3
    moments = FeatureMoments(6)
    for part in a.split(128):
        moments.update(part)
    mu, sigma = moments.mu_sigma()
    assert np.allclose(mu, a.double().mean(0).numpy()) and np.allclose(
        sigma, np.cov(a.double().numpy(), rowvar=False)
    )
    ref = ReferenceStats.from_features(b)
    expected = _compute_fid(*(torch.from_numpy(x) for x in (mu, sigma, ref.mu, ref.sigma)))
    assert frechet_distance(mu, sigma, ref.mu, ref.sigma) == pytest.approx(float(expected))


def test_reference_files_round_trip_and_foreign_files_are_checked(tiny_run, tmp_path, capsys):
    """python -m ddpm.evaluation.reference writes mu/sigma and what made them; scoring
    against the file equals scoring against the data; a pytorch-fid-layout file (mu and
    sigma only) loads; other feature spaces are refused in one line."""
    ref = tmp_path / "digits_train.npz"
    made = call_entry("ddpm.evaluation.reference", "data=digits", "split=train", f"out={ref}",
                      cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    stats, net = ReferenceStats.load(ref), load_digits_feature_net()
    assert stats.mu.shape == (128,) and stats.sigma.shape == (128, 128)
    assert stats.meta["extractor"] == "digits" and stats.meta["num_images"] == 1617
    assert stats.meta["extractor_hash"] == weights_hash(net)
    assert stats.meta["quantization"].startswith("uint8") and stats.meta["split"] == "train"
    data = ImageDataModule(name="digits")
    images = data.split_images("val")
    against_data = evaluate_images(images, data, split="train")
    against_file = evaluate_images(images, data, fid_reference=ref)
    assert against_file["fid"] == pytest.approx(against_data["fid"], rel=1e-6)
    assert against_file["kid_mean"] == pytest.approx(against_data["kid_mean"], rel=1e-6)

    foreign = tmp_path / "pytorch_fid.npz"  # np.savez(path, mu=mu, sigma=sigma), as pytorch-fid
    np.savez(foreign, mu=stats.mu, sigma=stats.sigma)
    out = tmp_path / "out"
    cfg = _compose_sample([f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}",
                           f"out_dir={out}", *FAST, "num_samples=20", "evaluate=true",
                           f"fid_reference={foreign}"])  # fmt: skip
    draw(cfg, prepare_sample(cfg))
    assert "does not say how it was made" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["kid_mean"] is None
    assert metrics["reference"] == {"file": str(foreign), "num_images": None}

    wide = tmp_path / "inception_like.npz"
    np.savez(wide, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError) as info:
        file_reference(wide, "digits", net)
    assert str(info.value) == (
        f"{wide} holds 2048-d statistics but digits features are 128-d: make a reference "
        "with python -m ddpm.evaluation.reference feature_extractor=digits ... out=FILE.npz"
    )
    other = ReferenceStats(stats.mu, stats.sigma, None, {"extractor": "inception"})
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="holds inception features but this evaluation uses"):
        file_reference(tmp_path / "other.npz", "digits", net)
    other.meta = {"extractor": "digits", "extractor_hash": "0123456789abcdef"}
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="was made with other digits weights"):
        file_reference(tmp_path / "other.npz", "digits", net)


def _compose_sample(overrides: list[str]) -> DictConfig:
    """conf/sample.yaml as Hydra composes it for sample.py."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


def test_a_draw_in_progress_is_not_mixed_with_another(tiny_run, tmp_path):
    """In-process, the path sample.py takes (prepare_sample, then draw): another draw's
    out_dir and bad values are refused before anything is written."""
    out = tmp_path / "out"
    base = [f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}", f"out_dir={out}", *FAST]
    cfg = _compose_sample([*base, "num_samples=4", "chunk_size=3"])
    draw(cfg, prepare_sample(cfg))
    before = (out / "samples.npz").read_bytes()
    assert not (out / "metrics.json").exists()
    # the same draw again with evaluate=true: nothing drawn, the features are taken from
    # the chunks' images, in the same batches as a draw that computes them as it goes
    cfg = _compose_sample([*base, "num_samples=4", "chunk_size=3", "evaluate=true"])
    draw(cfg, prepare_sample(cfg))
    assert (out / "samples.npz").read_bytes() == before
    fresh = _compose_sample([*base, "num_samples=4", "chunk_size=3", "evaluate=true",
                             f"out_dir={tmp_path / 'fresh'}"])  # fmt: skip
    draw(fresh, prepare_sample(fresh))
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "fresh"))
    assert m1["resumed_samples"] == 4 and m2["resumed_samples"] == 0
    assert m1["fid"] == pytest.approx(m2["fid"], rel=1e-6)
    assert m1["kid_mean"] == pytest.approx(m2["kid_mean"], rel=1e-6)
    for args, message in [
        (["num_samples=4", "chunk_size=3", "seed=1"], f"out_dir={out} holds another draw "
         "(seed=0 there, 1 here): pick another out_dir, or rerun with its values to finish it"),
        (["chunk_size=0"], "chunk_size=0 is not allowed: it must be an integer >= 1"),
        (["fid_reference=x.npz"], "fid_reference is only read with evaluate=true"),
        (["device=tpu"], "device='tpu' is unknown; use cpu, cuda, cuda:K or mps"),
    ]:  # fmt: skip
        with pytest.raises((ValueError, UsageError)) as info:
            prepare_sample(_compose_sample([*base, *args]))
        assert str(info.value).startswith(message), args
    assert (out / "samples.npz").read_bytes() == before
