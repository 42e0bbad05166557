"""Safe checkpoints: atomic writes, weights_only loading, clear messages for bad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.runs.build import load_module
from ddpm.runs.checkpoints import (
    CheckpointError,
    config_differences,
    newest_checkpoint,
    read_checkpoint,
)
from ddpm.runs.errors import UsageError
from ddpm.runs.prepare import prepare
from ddpm.utils.files import atomic_torch_save, sweep_partial_files
from tests.conftest import ROOT, call_entry, compose_train


@pytest.fixture
def ckpt(tiny_run) -> Path:
    return tiny_run / "checkpoints" / "last.ckpt"


def test_atomic_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]  # no temporary left


def test_killed_writer_leaves_the_old_file_and_a_partial_to_sweep(tmp_path):
    """A real process writing a 400 MB object is SIGKILLed while its temporary file exists."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    code = (
        "import torch, sys; from pathlib import Path;"
        "from ddpm.utils.files import atomic_torch_save;"
        "atomic_torch_save({'w': torch.randn(100_000_000)}, Path(sys.argv[1]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".tmp-*.part")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert len(sweep_partial_files(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_newest_checkpoint_ignores_partial_writes(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "best.ckpt").write_bytes(b"1")
    time.sleep(0.01)
    (ckpts / "last.ckpt").write_bytes(b"2")
    (ckpts / ".tmp-abc.part").write_bytes(b"3")
    assert newest_checkpoint(tmp_path).name == "last.ckpt"
    time.sleep(0.01)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"4")  # Lightning's SLURM requeue checkpoint
    assert newest_checkpoint(tmp_path).name == "hpc_ckpt_1.ckpt"
    with pytest.raises(CheckpointError, match="has no checkpoint to continue from"):
        newest_checkpoint(tmp_path / "nowhere")


def test_config_differences_name_each_key():
    old = {"model": {"base_channels": 32, "channel_mults": [1, 2]}, "data": {"image_size": 8}}
    new = {"model": {"base_channels": 64, "channel_mults": [1, 2]}, "data": {"image_size": 16}}
    assert config_differences(old, new) == [
        "data.image_size: checkpoint 8, this run 16",
        "model.base_channels: checkpoint 32, this run 64",
    ]


class Exploit:
    """Unpickling this runs a shell command: what weights_only=True must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_sample_refuses_a_malicious_checkpoint(ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    evil = torch.load(ckpt, weights_only=True)
    evil["payload"] = Exploit(marker)
    torch.save(evil, tmp_path / "evil.ckpt")
    result = call_entry(
        "sample.py",
        f"ckpt_path={tmp_path / 'evil.ckpt'}",
        f"out_dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to load" in result.stderr and "weights_only=True" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    cfg = compose_train([f"ckpt_path={tmp_path / 'evil.ckpt'}"], tmp_path / "run")
    with pytest.raises(CheckpointError, match="refusing to load"):  # train.py's path
        prepare(cfg)
    assert not marker.exists()  # the payload never ran


def test_truncated_and_mismatched_checkpoints_get_their_message(ckpt, tmp_path):
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    result = call_entry(
        "sample.py", f"ckpt_path={tmp_path / 'cut.ckpt'}", f"out_dir={tmp_path / 'o'}", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"checkpoint {tmp_path / 'cut.ckpt'} is truncated or corrupt" in result.stderr

    other = torch.load(ckpt, weights_only=True)
    other["hyper_parameters"]["config"]["model"]["base_channels"] = 16
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(UsageError, match=r"do not fit the network .* shape\(s\) differ"):
        load_module(tmp_path / "other.ckpt")  # what sample.py reports
    result = call_entry(
        "sample.py",
        f"ckpt_path={tmp_path / 'other.ckpt'}",
        f"out_dir={tmp_path / 'o'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "do not fit the network its stored config builds" in result.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match="not a ddpm training checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
        read_checkpoint(tmp_path / "foreign.ckpt")
