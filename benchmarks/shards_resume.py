"""Exact resume on shards under DDP, with a real kill: 2 gloo processes with 2 loader
workers each train 20 steps straight; the same run is SIGKILLed once its step-10
checkpoint is written, continued with ``resume=``, and must end with the same weights and
see the same batches at every step, every training image exactly once in the epoch.

    python benchmarks/shards_resume.py --work /tmp/shards_resume

320 training images of 16 px (400 written, 20% held out), 8 per device: one epoch is 20
steps. Writes ``--out``/shards_resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def fabricate(folder: Path, count: int = 400, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(cls / f"{i:05d}.png")


def train(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def step_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return -1


def max_diff(a: object, b: object) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        return max([max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, list | tuple):
        return max([max_diff(x, y) for x, y in zip(a, b, strict=True)] or [0.0])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_scale")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(work / "cache"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    shards = work / "shards"
    if not (shards / "ddpm_shards.json").is_file():
        fabricate(work / "images")
        subprocess.run([sys.executable, "-m", "ddpm.data.shards", str(work / "images"),
                        str(shards), "--chunk-bytes", "32KB"], check=True, env=env)  # fmt: skip
    common = ["data=shards", f"data.root={shards}", "data.image_size=16", "data.channels=3",
              "data.val_fraction=0.2", "data.batch_size=8", "data.num_workers=2",
              "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.deterministic=true", "trainer.max_steps=20",
              "trainer.val_check_interval=10", "trainer.log_every_n_steps=5",
              "model.base_channels=32", "eval=null", "logger=csv", "seed=5",
              "callbacks.sample_grid.num_samples=4", "sampler.steps=3",
              "+callbacks.batches._target_=tests.faults.BatchLog"]  # fmt: skip
    result: dict = {}
    straight, killed = work / f"straight-{time.time_ns()}", work / f"killed-{time.time_ns()}"
    start = time.perf_counter()
    proc = train([*common, f"+callbacks.batches.out_dir={straight}-batches",
                  f"hydra.run.dir={straight}"], work, env)  # fmt: skip
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    result["straight_seconds"] = time.perf_counter() - start
    proc = train([*common, f"+callbacks.batches.out_dir={killed}-batches",
                  f"hydra.run.dir={killed}"], work, env)  # fmt: skip
    last = killed / "checkpoints" / "last.ckpt"
    while step_of(last) < 10:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result["killed_at_checkpoint_step"] = step_of(last)
    start = time.perf_counter()
    proc = train([f"resume={killed}"], work, env)
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    result["resume_seconds"] = time.perf_counter() - start
    a, b = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (straight, killed)
    )
    for key in ("state_dict", "current_model_state", "optimizer_states"):
        result[f"max_diff_{key}"] = max_diff(a[key], b[key])
    logs = {n: [torch.load(Path(f"{r}-batches") / f"rank{k}.pt") for k in (0, 1)]
            for n, r in (("straight", straight), ("killed", killed))}  # fmt: skip
    resumed_steps = sorted(logs["killed"][0])
    result["resumed_steps"] = [resumed_steps[0], resumed_steps[-1]]
    result["same_batches_after_resume"] = all(
        logs["killed"][k][s] == logs["straight"][k][s] for k in (0, 1) for s in resumed_steps
    )
    epoch = [i for rank in logs["straight"] for s in range(20) for i in rank[s]]
    result["epoch_images"], result["distinct_images"] = len(epoch), len(set(epoch))
    result["every_image_once"] = sorted(epoch) == list(range(320))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shards_resume.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
