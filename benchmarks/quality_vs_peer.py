"""Quality per wall-clock second: the default ``python train.py`` next to the peer recipe
(diffusers' unconditional training example, benchmarks/peer_diffusers.py) on the digits,
at the same wall-clock budgets B, 2B, 4B, with one evaluator.

    pip install -e ".[bench]"
    python benchmarks/quality_vs_peer.py                 # B = the default run's wall time
    python benchmarks/quality_vs_peer.py --budgets 1 2   # fewer budgets

- Ours: ``python train.py`` (every default: EMA, grids, in-training FID, wandb offline),
  each run with an empty feature/statistics cache (``DDPM_CACHE_DIR``), as on a fresh
  machine; B is its wall time. At kB: the same command with ``trainer.max_steps`` k times
  the default (its wall time is reported; fixed start-up costs make it below kB).
- Peer: trained in this process until exactly kB wall seconds have passed.
- Samples: 1,000 per seed and sampler; ours with its default sampler, the peer with
  DDPM-1000 and DDIM-50.
- FID (digits features, ``ddpm.evaluation``), two protocols:
  ``fid``: all 1,000 samples against the statistics of the training split (val/fid's way);
  ``fid_half``: the first M samples against one half of all 1,797 real digits, where M is
  the other half's size (898); the real-data floor is that other half against the same
  half, so floor and samples are at the same N, against the same reference, computed the
  same way. The halves are a fixed random permutation (seed 0); the floor's spread over
  three permutations (seeds 0, 1, 2) is given beside it.
Each finished run and evaluation is kept in OUT/results.json; a rerun skips them.
Writes OUT/table.md, OUT/results.json, OUT/fid_vs_seconds.png and 64-image grids; the
runs' checkpoints and logs go to --runs (outputs/quality_vs_peer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_diffusers

from ddpm.data.datamodule import ImageDataModule
from ddpm.evaluation.features import extract_features, load_digits_feature_net
from ddpm.evaluation.metrics import frechet_distance
from ddpm.evaluation.stats_file import ReferenceStats
from ddpm.runs.build import load_module
from ddpm.utils.images import line_chart, make_grid, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]


class Evaluator:
    """The two FID protocols of the module docstring, on the digits feature net."""

    def __init__(self) -> None:
        data = ImageDataModule(name="digits")
        self.net = load_digits_feature_net()
        self.train_ref = ReferenceStats.from_features(self.features(data.split_images("train")))
        every = self.features(data.split_images("all"))  # [1797, D]
        self.halves = []
        for seed in (0, 1, 2):
            order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))
            first, second = order[: (len(every) + 1) // 2], order[(len(every) + 1) // 2 :]
            self.halves.append((ReferenceStats.from_features(every[first]), every[second]))
        self.m = len(self.halves[0][1])
        floors = [self.fid(ref, real) for ref, real in self.halves]
        self.floor, self.floor_std = floors[0], float(np.std(floors))
        self.floor_all = floors

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return extract_features(self.net, images)

    @staticmethod
    def fid(reference: ReferenceStats, features: torch.Tensor) -> float:
        sample = ReferenceStats.from_features(features)
        return float(frechet_distance(sample.mu, sample.sigma, reference.mu, reference.sigma))

    def __call__(self, images: torch.Tensor) -> dict:
        feats = self.features(images)
        return {
            "fid": self.fid(self.train_ref, feats),
            "fid_half": self.fid(self.halves[0][0], feats[: self.m]),
        }


def train_ours(k: int, out: Path, default_steps: int) -> dict:
    """``python train.py`` (k = 1) or with k times the steps, in a fresh cache; wall time."""
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}"]
    if k != 1:
        command.append(f"trainer.max_steps={k * default_steps}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": cache}
        print("training:", " ".join(command), flush=True)
        start = time.perf_counter()
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "steps": k * default_steps,
        "ckpt": str(out / "checkpoints/last.ckpt"),
    }


def draw_ours(ckpt: str, num: int, seed: int) -> tuple[torch.Tensor, str]:
    module = load_module(Path(ckpt))
    name = type(module.sampler).__name__
    steps = getattr(module.sampler, "steps", None)
    images = module.sample(num, seed=seed, batch_size=500)  # the run's own (default) sampler
    return images, f"{name}-{steps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--base-seconds", type=float, help="B (default: measure ours at 1x)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--peer-samplers", nargs="+", default=["ddpm-1000", "ddim-50"])
    parser.add_argument(
        "--slow-budgets",
        type=int,
        nargs="+",
        help="draw peer samplers of more than 100 steps (DDPM-1000: 20x DDIM-50's cost) only "
        "at these budgets (default: all)",
    )
    parser.add_argument("--slow-seeds", type=int, nargs="+", help="... and only these seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality_vs_peer")
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "outputs/quality_vs_peer", help="checkpoints, logs"
    )
    args = parser.parse_args()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "evals": {}}

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    default_steps = int(OmegaConf.load(ROOT / "conf/trainer/default.yaml").max_steps)
    runs = results["runs"]
    for k in args.budgets:  # ours first: B is the default run's wall time
        if f"ours_x{k}" not in runs:
            runs[f"ours_x{k}"] = train_ours(k, args.runs / f"ours_x{k}", default_steps)
            save()
    base = args.base_seconds or runs["ours_x1"]["seconds"]
    results["base_seconds"] = base
    data = ImageDataModule(name="digits")
    train_images = data.split_images("train")  # the images ours trains on
    for k in args.budgets:
        if f"peer_x{k}" not in runs:
            print(f"training the peer for {k * base:.0f} s", flush=True)
            runs[f"peer_x{k}"] = peer_diffusers.train_peer(
                train_images, k * base, seed=0, out=args.runs / f"peer_x{k}"
            )
            runs[f"peer_x{k}"]["budget"] = k * base
            save()

    evaluator = Evaluator()
    results["floor"] = {
        "fid_half": evaluator.floor,
        "std_over_permutations": evaluator.floor_std,
        "per_permutation": evaluator.floor_all,
        "n": evaluator.m,
    }
    evals = results["evals"]
    for k in args.budgets:
        systems = [("ours", None)] + [("peer", spec) for spec in args.peer_samplers]
        for system, spec in systems:
            for seed in args.seeds:
                key = f"{system}_x{k}/{spec or 'default'}/seed{seed}"
                if key in evals or (spec and is_slow(spec, k, seed, args)):
                    continue
                start = time.perf_counter()
                if system == "ours":
                    images, spec_name = draw_ours(
                        runs[f"ours_x{k}"]["ckpt"], args.num_samples, seed
                    )
                else:
                    sampler, _, steps = spec.partition("-")
                    weights = Path(runs[f"peer_x{k}"]["weights"])
                    images = peer_diffusers.sample_peer(
                        weights, sampler, int(steps), args.num_samples, seed
                    )
                    spec_name = spec
                seconds = time.perf_counter() - start  # the draw alone
                row = {**evaluator(images), "sampler": spec_name, "sample_seconds": seconds}
                evals[key] = row
                print(key, json.dumps(row), flush=True)
                if seed == args.seeds[0]:
                    grid = make_grid(to_uint8(images[:64]))
                    save_png(grid, out / f"grid_{system}_x{k}_{spec or 'default'}.png")
                save()
    write_report(results, args, out)


def is_slow(spec: str, k: int, seed: int, args: argparse.Namespace) -> bool:
    """Whether ``spec`` (SAMPLER-STEPS) is skipped at budget k and ``seed``."""
    if int(spec.rpartition("-")[2]) <= 100:
        return False
    return (args.slow_budgets is not None and k not in args.slow_budgets) or (
        args.slow_seeds is not None and seed not in args.slow_seeds
    )


def summarise(results: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (system, sampler, budget): mean and std over the sample seeds."""
    rows = []
    for k in args.budgets:
        for system, spec in [("ours", "default")] + [("peer", s) for s in args.peer_samplers]:
            found = [
                results["evals"][f"{system}_x{k}/{spec}/seed{s}"]
                for s in args.seeds
                if f"{system}_x{k}/{spec}/seed{s}" in results["evals"]
            ]
            if not found:
                continue
            run = results["runs"][f"{system}_x{k}"]
            row = {"system": system, "k": k, "sampler": found[0]["sampler"], "seeds": len(found)}
            row.update(steps=run["steps"], seconds=run["seconds"])
            for name in ("fid", "fid_half"):
                values = [f[name] for f in found]
                row[name], row[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
            rows.append(row)
    return rows


def write_report(results: dict, args: argparse.Namespace, out: Path) -> None:
    rows = summarise(results, args)
    floor = results["floor"]
    lines = [
        f"B = {results['base_seconds']:.0f} s (the default `python train.py`, fresh cache); "
        f"{args.num_samples} samples per seed, seeds {args.seeds}; mean +- std over the "
        f"seeds. `fid`: {args.num_samples} samples vs the training split; `fid_half`: "
        f"{floor['n']} samples vs one half of all digits. Real-data floor (`fid_half` of the "
        f"other half): {floor['fid_half']:.2f} (+- {floor['std_over_permutations']:.2f} over "
        f"3 halvings); {torch.get_num_threads()} CPU threads.",
        "",
        "| budget | system | sampler | steps | train wall (s) | seeds | fid | fid_half | "
        "fid_half / floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']}B | {r['system']} | {r['sampler']} | {r['steps']} | "
            f"{r['seconds']:.0f} | {r['seeds']} | {r['fid']:.2f} +- {r['fid_std']:.2f} | "
            f"{r['fid_half']:.2f} +- {r['fid_half_std']:.2f} | "
            f"{r['fid_half'] / floor['fid_half']:.2f} |"
        )
    lines += ["", "| budget | peer's best fid_half / ours |", "|---|---:|"]
    for k in args.budgets:
        ours = [r for r in rows if r["k"] == k and r["system"] == "ours"]
        peer = [r for r in rows if r["k"] == k and r["system"] == "peer"]
        if ours and peer:
            best = min(r["fid_half"] for r in peer)
            lines.append(f"| {k}B | {best / ours[0]['fid_half']:.2f} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        name = "ours" if r["system"] == "ours" else f"peer {r['sampler']}"
        series.setdefault(name, []).append((r["k"] * results["base_seconds"], r["fid_half"]))
    xs = [x for pts in series.values() for x, _ in pts]
    series["real-data floor"] = [(min(xs), floor["fid_half"]), (max(xs), floor["fid_half"])]
    title = "FID (fid_half, mean over seeds) vs wall-clock budget"
    chart = line_chart(series, title, "budget: wall seconds (log)", "FID")
    save_png(chart, out / "fid_vs_seconds.png")


if __name__ == "__main__":
    main()
