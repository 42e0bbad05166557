"""Your own images at scale: decode-once time, memory per DDP-like rank, loader throughput
of each mode, and the peak memory of FID reference statistics.

    python benchmarks/data_scale.py --work /tmp/scale [--images 20000] [--size 64]

Fabricates ``--images`` JPEGs of ``--size`` px in two class folders under ``--work`` (once),
writes them as shards, then measures, each in fresh processes so peaks are their own:

- ``decode``: the in-memory folder mode's setup on an empty cache (the decode), then again
  (the cache reused), as 1 process and as 2 processes at once (two ranks of a machine):
  each process's peak RSS and its proportional share (PSS: a page shared by two counts
  half in each), after a pass over 110 batches;
- ``loaders``: images/s through the train loader of the in-memory folder, the streaming
  folder and the shards (batch 64, loader workers as ``--workers``; batches 10-110, after
  the workers have started);
- ``reference``: peak RSS of ``python -m ddpm.evaluation.reference`` on the folder
  (``feature_extractor=digits``: no download), at ``--ref-images`` images, in memory (the
  decode cache's file pages, which the kernel can drop, count in RSS) and streamed.

``--ddpm PATH`` runs the measurements against another checkout (e.g. a worktree of an older
commit) for a before/after in the same session. Results go to ``--out`` as JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANK = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from ddpm.data.datamodule import ImageDataModule
kind, root, size, workers = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
start = time.perf_counter()
name = "folder" if kind.startswith("folder") else kind
dm = ImageDataModule(name=name, root=root, image_size=size, channels=3, batch_size=64,
                     in_memory=kind == "folder_memory", num_workers=workers)
dm.setup("fit")
setup = time.perf_counter() - start
class T:
    training, global_step, accumulate_grad_batches, global_rank, world_size = True, 0, 1, 0, 1
    num_devices = 1
dm.trainer = T()
count, start = 0, time.perf_counter()
for i, (x, y, _) in enumerate(dm.train_dataloader()):
    if i == 10:  # workers started and warm: time the next 100 batches
        count, start = 0, time.perf_counter()
    if i == 110:
        break
    count += x.shape[0]
rate = count / (time.perf_counter() - start)
pss = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("Pss:"):
        pss = int(line.split()[1]) // 1024
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"setup_s": setup, "images_per_s": rate, "peak_rss_mb": peak, "pss_mb": pss}))
"""


def fabricate(folder: Path, count: int, size: int) -> None:
    """``count`` JPEGs of smooth random colour fields, half in each of two classes."""
    import numpy as np
    from PIL import Image

    if folder.is_dir() and len(list(folder.rglob("*.jpg"))) == count:
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        image.save(cls / f"{i:07d}.jpg", quality=90)


def rank(ddpm: Path, kind: str, root: Path, size: int, workers: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RANK, str(ddpm), kind, str(root), str(size), str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def ranks(ddpm: Path, kind: str, root: Path, size: int, workers: int, n: int, cache: Path):
    env = {**os.environ, "DDPM_CACHE_DIR": str(cache), "PYTHONPATH": str(ddpm)}
    procs = [rank(ddpm, kind, root, size, workers, env) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def reference_peak(
    ddpm: Path, folder: Path, size: int, cache: Path, out: Path, in_memory: bool
) -> dict:
    env = {**os.environ, "DDPM_CACHE_DIR": str(cache), "PYTHONPATH": str(ddpm)}
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    command = [sys.executable, "-c", probe, sys.executable, "-m", "ddpm.evaluation.reference",
               "data=folder", f"data.root={folder}", f"data.image_size={size}", "split=all",
               "feature_extractor=digits", f"out={out}",
               f"data.in_memory={str(in_memory).lower()}"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ddpm)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    peak = int(result.stdout.strip().splitlines()[-1]) // 1024
    return {"peak_rss_mb": peak, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--ref-images", type=int, default=30_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ddpm", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--only", default="decode,loaders,reference")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_scale")
    args = parser.parse_args()
    folder, only = args.work / f"jpeg{args.images}", args.only.split(",")
    fabricate(folder, args.images, args.size)
    results: dict = {"images": args.images, "size": args.size, "ddpm": str(args.ddpm)}
    if "decode" in only:
        for n in (1, 2):
            cache = args.work / f"cache-decode-{n}-{time.time_ns()}"
            results[f"decode_{n}_cold"] = ranks(args.ddpm, "folder_memory", folder, args.size,
                                                0, n, cache)  # fmt: skip
            results[f"decode_{n}_warm"] = ranks(args.ddpm, "folder_memory", folder, args.size,
                                                0, n, cache)  # fmt: skip
    if "loaders" in only:
        cache = args.work / "cache-loaders"
        shards = args.work / f"shards{args.images}"
        if not (shards / "ddpm_shards.json").is_file():
            command = [sys.executable, "-m", "ddpm.data.shards", str(folder), str(shards)]
            env = {**os.environ, "PYTHONPATH": str(args.ddpm)}
            subprocess.run(command, check=True, env=env)
        for kind, root in (("folder_memory", folder), ("folder", folder), ("shards", shards)):
            workers = 0 if kind == "folder_memory" else args.workers
            results[f"loader_{kind}"] = ranks(args.ddpm, kind, root, args.size, workers, 1,
                                              cache)[0]  # fmt: skip
    if "reference" in only:
        ref = args.work / f"jpeg{args.ref_images}"
        fabricate(ref, args.ref_images, args.size)
        for in_memory in (True, False):  # in memory: the decode cache's pages count in RSS
            cache = args.work / f"cache-ref-{time.time_ns()}"
            key = f"reference_{args.ref_images}_{'memory' if in_memory else 'streaming'}"
            results[key] = reference_peak(args.ddpm, ref, args.size, cache,
                                          args.work / "ref.npz", in_memory)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "results.json" if args.ddpm == ROOT else f"results-{args.ddpm.name}.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
