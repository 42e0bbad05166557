"""sample.py at scale: samples/s on 1 and 2 processes, peak memory against the sample
count, and the time of a CIFAR-10 FID-50k computed from the networks' FLOPs.

    python benchmarks/sample_scaling.py CKPT [--num-samples 2000] [--out DIR]
        [--rss 2000,20000] [--gpus 8] [--tflops 495] [--utilisation 0.3]

1. ``python sample.py ckpt_path=CKPT num_samples=N accelerator=cpu devices=D`` for D = 1
   and 2 (its own sampler, chunks of 250, no PNGs): the draw rate sample.py prints (samples
   written / seconds since drawing began) and the command's wall time.
2. Peak RSS of one sample.py process (measured by its parent) for each count in ``--rss``
   (``sampler=ddim sampler.steps=3 evaluate=true``, so the run is short and streams
   features too).
3. FLOPs of one forward pass of ``experiment=cifar10_ddpm``'s and ``cifar10_edm``'s nets
   at 32x32 (``FlopCounterMode``), times 50,000 x NFE (1,000 for the ancestral sampler,
   35 for EDM's Heun sampler), over ``--gpus`` GPUs at ``--tflops`` x ``--utilisation``
   sustained (default: an H100's 495 dense TF32 TFLOP/s, which fp32 convolutions use by
   default, at 30%; say what you assume when you quote it).

Writes ``OUT/results.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ddpm.runs.cli  # noqa: E402, F401 - registers the ${ddpm.*} resolvers

RATE = re.compile(r"drawn (\d+)/(\d+) samples \(([\d.]+)/s")


def draw_rate(ckpt: str, n: int, devices: int, work: Path) -> dict[str, float]:
    out = work / f"rate_{devices}"
    command = [sys.executable, str(ROOT / "sample.py"), f"ckpt_path={ckpt}", f"out_dir={out}",
               f"num_samples={n}", "chunk_size=250", "save_png=false", "accelerator=cpu",
               f"devices={devices}"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    rate = float(RATE.findall(result.stdout)[-1][2])
    return {"devices": devices, "samples": n, "samples_per_s": rate, "wall_s": round(wall, 1)}


def peak_rss(ckpt: str, n: int, work: Path) -> dict[str, float]:
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    command = [sys.executable, "-c", probe, sys.executable, str(ROOT / "sample.py"),
               f"ckpt_path={ckpt}", f"out_dir={work / f'rss_{n}'}", f"num_samples={n}",
               "sampler=ddim", "sampler.steps=3", "accelerator=cpu", "chunk_size=500",
               "save_png=false", "evaluate=true"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=work)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return {"samples": n, "peak_rss_mb": round(int(result.stdout.split()[-1]) / 1024, 1)}


def forward_flops(experiment: str) -> tuple[float, int]:
    """FLOPs of one forward pass of the experiment's net on one 32x32 image; parameters."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    net = instantiate(cfg.model).eval()
    x, t = torch.zeros(1, 3, 32, 32), torch.zeros(1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t)
    return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--rss", default="2000,20000")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tflops", type=float, default=495.0)
    parser.add_argument("--utilisation", type=float, default=0.3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sample_scaling"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rates = [draw_rate(args.ckpt, args.num_samples, d, work) for d in (1, 2)]
        memory = [peak_rss(args.ckpt, int(n), work) for n in args.rss.split(",")]
    sustained = args.tflops * 1e12 * args.utilisation * args.gpus
    plans = []
    for experiment, nfe in (("cifar10_ddpm", 1000), ("cifar10_edm", 35)):
        flops, params = forward_flops(experiment)
        seconds = 50_000 * nfe * flops / sustained
        gflops, hours = round(flops / 1e9, 2), round(seconds / 3600, 2)
        plans.append({"experiment": experiment, "params": params, "nfe": nfe,
                      "gflops_per_forward": gflops, "hours_on_gpus": hours})  # fmt: skip
    results = {"rates": rates, "memory": memory, "fid50k": plans, "assumption": vars(args)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| processes | samples | samples/s | command wall s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['devices']} | {r['samples']} | {r['samples_per_s']:.1f} | {r['wall_s']} |"
              for r in rates]  # fmt: skip
    lines += ["", "| samples | peak RSS (MB) |", "|---:|---:|"]
    lines += [f"| {m['samples']} | {m['peak_rss_mb']} |" for m in memory]
    lines += ["", f"FID-50k on {args.gpus} GPUs at {args.tflops:g} TFLOP/s x "
              f"{args.utilisation:g} each (computed, not measured):", "",
              "| net | params | GFLOPs/forward | NFE | hours |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {p['experiment']} | {p['params'] / 1e6:.1f}M | {p['gflops_per_forward']} | "
              f"{p['nfe']} | {p['hours_on_gpus']} |" for p in plans]  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
