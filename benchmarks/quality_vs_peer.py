"""Quality per wall-clock second on the held-out yardstick: the default ``python train.py``
next to two peers, diffusers' DDPM recipe (benchmarks/peer_diffusers.py) and k-diffusion's
EDM recipe (benchmarks/peer_kdiffusion.py), at the same wall-clock budgets B, 2B, 4B.

    pip install -e ".[bench]"            # + k-diffusion: docs/quality.md
    python benchmarks/quality_vs_peer.py --data digits
    python benchmarks/quality_vs_peer.py --data mnist5k --budgets 1 2

The protocol (docs/quality.md):
- The data are halved by ``data.val_fraction=0.5`` (``data.split_seed=0``): every system
  trains on the train half (digits 899, mnist5k 2,000) and is scored against the other
  half, which none of them saw.
- The features never saw either half: ``digits_heldout`` (trained on MNIST) for the
  digits, ``mnist`` (trained on the 1,000 MNIST digits data=mnist5k leaves out) for mnist5k.
- Every figure is ``ddpm.evaluation.heldout.heldout_report`` at equal N (the reference
  half's size): FID, precision and recall (k = 5) of the first N samples against the
  reference half, memorisation against the train half; the floor is the train half scored
  the same way.
- Ours: ``python train.py`` (every default: EMA, grids, in-training FID, wandb offline)
  with the data halved, in an empty cache (``DDPM_CACHE_DIR``); B is its wall time. At kB
  the same command with k times the steps (fixed start-up costs make it below kB).
- Peers: trained in this process until exactly kB wall seconds have passed.
- Samples: 3 seeds; ours with its default sampler, diffusers' with DDIM-50, k-diffusion's
  with its DPM-Solver++(2M) SDE (eta 0) on 50 Karras sigmas.
Each finished run and evaluation is kept in OUT/results.json; a rerun skips them. Writes
OUT/table.md, OUT/results.json, OUT/fid_vs_seconds.png and 64-image grids, OUT being
benchmarks/results/quality_vs_peer/DATA; the runs go to --runs.
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
import peer_kdiffusion

from ddpm.data.datamodule import ImageDataModule
from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.heldout import heldout_report
from ddpm.runs.build import load_module
from ddpm.utils.images import line_chart, make_grid, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]
DATA = {  # name -> (ours' overrides, image size, feature net)
    "digits": (["data.val_fraction=0.5"], 8, "digits_heldout"),
    "mnist5k": (["data=mnist5k"], 28, "mnist"),
}
SYSTEMS = {  # system/sampler -> what the table calls it, and the chart
    "ours/default": ("ours", "ours"),
    "diffusers/ddim-50": ("diffusers DDPM recipe, DDIM-50", "diffusers DDIM-50"),
    "diffusers/ddpm-1000": ("diffusers DDPM recipe, DDPM-1000", "diffusers DDPM-1000"),
    "kdiffusion/dpmpp_2m_sde-50": ("k-diffusion EDM recipe, DPM++(2M) SDE-50", "k-diffusion"),
}
METRICS = ("fid", "precision", "recall", "memorisation")


def train_ours(
    data: str, k: int, out: Path, default_steps: int, extra: tuple[str, ...] = ()
) -> dict:
    """``python train.py`` on the train half (k times the steps; ``extra`` overrides), in
    a fresh cache."""
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *DATA[data][0]]
    if k != 1:
        command.append(f"trainer.max_steps={k * default_steps}")
    command += extra
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


def draw(system: str, sampler: str, run: dict, num: int, seed: int) -> tuple[torch.Tensor, str]:
    """``num`` samples of a trained system and the sampler's name."""
    if system == "ours":
        module = load_module(Path(run["ckpt"]))
        name = f"{type(module.sampler).__name__}-{getattr(module.sampler, 'steps', None)}"
        return module.sample(num, seed=seed, batch_size=500), name  # its default sampler
    kind, _, steps = sampler.partition("-")
    weights, size = Path(run["weights"]), run["image_size"]
    if system == "diffusers":
        return peer_diffusers.sample_peer(
            weights, kind, int(steps), num, seed, image_size=size
        ), sampler
    return peer_kdiffusion.sample_peer(weights, size, int(steps), num, seed), sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="digits")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--base-seconds", type=float, help="B (default: measure ours at 1x)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    default_systems = ["ours/default", "diffusers/ddim-50", "kdiffusion/dpmpp_2m_sde-50"]
    parser.add_argument("--systems", nargs="+", default=default_systems, choices=sorted(SYSTEMS))
    parser.add_argument(
        "--report-only", action="store_true", help="write the table and chart from OUT/results.json"
    )
    parser.add_argument("--out", type=Path, help="default benchmarks/results/quality_vs_peer/DATA")
    parser.add_argument(
        "--runs", type=Path, help="checkpoints, logs (outputs/quality_vs_peer/DATA)"
    )
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks/results/quality_vs_peer" / args.data
    runs_dir = args.runs or ROOT / "outputs/quality_vs_peer" / args.data
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "evals": {}}

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    if args.report_only:  # what was measured so far: rows with fewer seeds say how many
        write_report(results, args, out)
        return

    default_steps = int(OmegaConf.load(ROOT / "conf/trainer/default.yaml").max_steps)
    runs = results["runs"]
    for k in args.budgets:  # ours first: B is the default run's wall time
        if "ours/default" in args.systems and f"ours_x{k}" not in runs:
            runs[f"ours_x{k}"] = train_ours(args.data, k, runs_dir / f"ours_x{k}", default_steps)
            save()
    base = args.base_seconds or runs["ours_x1"]["seconds"]
    results["base_seconds"] = base
    _, size, feature_net = DATA[args.data]
    data = ImageDataModule(name=args.data, image_size=size, val_fraction=0.5)
    train_images = data.split_images("train")  # the half every system trains on
    peers = {"diffusers": peer_diffusers.train_peer, "kdiffusion": peer_kdiffusion.train_peer}
    for k in args.budgets:
        for system in sorted({s.split("/")[0] for s in args.systems} - {"ours"}):
            if f"{system}_x{k}" not in runs:
                print(f"training {system} for {k * base:.0f} s", flush=True)
                run = peers[system](train_images, k * base, 0, runs_dir / f"{system}_x{k}")
                runs[f"{system}_x{k}"] = {**run, "budget": k * base}
                save()

    extractor = build_feature_extractor(feature_net)
    results["protocol"] = {
        "data": args.data,
        "train_images": len(train_images),
        "reference_images": data.split_size("val"),
        "feature_extractor": feature_net,
        "cpu_threads": torch.get_num_threads(),
    }
    evals = results["evals"]
    for k in args.budgets:
        for spec in args.systems:
            system, _, sampler = spec.partition("/")
            for seed in args.seeds:
                key = f"{spec}/x{k}/seed{seed}"
                if key in evals:
                    continue
                start = time.perf_counter()
                images, name = draw(system, sampler, runs[f"{system}_x{k}"], args.num_samples, seed)
                seconds = time.perf_counter() - start  # the draw alone
                report = heldout_report(images, data, extractor, "val")
                evals[key] = {**report, "sampler": name, "sample_seconds": seconds}
                results["floor"] = report["floor"]
                print(key, json.dumps({m: report[m] for m in METRICS}), flush=True)
                if seed == args.seeds[0]:
                    grid = make_grid(to_uint8(images[:64]))
                    save_png(grid, out / f"grid_{system}_x{k}_{sampler}.png")
                save()
    write_report(results, args, out)


def summarise(results: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (system, budget): mean and std over the sample seeds."""
    rows = []
    for k in args.budgets:
        for spec in args.systems:
            found = [
                results["evals"][f"{spec}/x{k}/seed{s}"]
                for s in args.seeds
                if f"{spec}/x{k}/seed{s}" in results["evals"]
            ]
            if not found:
                continue
            run = results["runs"][f"{spec.split('/')[0]}_x{k}"]
            row = {"spec": spec, "k": k, "sampler": found[0]["sampler"], "seeds": len(found)}
            row.update(steps=run["steps"], seconds=run["seconds"], n=found[0]["n"])
            for name in METRICS:
                values = [f[name] for f in found]
                row[name], row[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
            rows.append(row)
    return rows


def write_report(results: dict, args: argparse.Namespace, out: Path) -> None:
    rows = summarise(results, args)
    floor, protocol = results["floor"], results["protocol"]
    lines = [
        f"Data {protocol['data']}: every system trains on {protocol['train_images']} images "
        f"and is scored against the other {protocol['reference_images']}, at equal N = "
        f"{rows[0]['n']}, in `{protocol['feature_extractor']}` features (never trained on "
        f"either half). B = {results['base_seconds']:.0f} s (the default `python train.py`, "
        f"fresh cache); seeds {args.seeds}, mean +- std over them; "
        f"{protocol['cpu_threads']} CPU threads. Floor (the train half against the "
        f"reference half): FID {floor['fid']:.2f}, precision {floor['precision']:.3f}, "
        f"recall {floor['recall']:.3f}, memorisation {floor['memorisation']:.2f} (by "
        "construction).",
        "",
        "| budget | system | sampler | steps | train wall (s) | seeds | FID | FID / floor | "
        "precision | recall | memorisation |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']}B | {SYSTEMS[r['spec']][0]} | {r['sampler']} | {r['steps']} | "
            f"{r['seconds']:.0f} | {r['seeds']} | {r['fid']:.2f} +- {r['fid_std']:.2f} | "
            f"{r['fid'] / floor['fid']:.2f} | {r['precision']:.3f} +- {r['precision_std']:.3f} | "
            f"{r['recall']:.3f} +- {r['recall_std']:.3f} | "
            f"{r['memorisation']:.3f} +- {r['memorisation_std']:.3f} |"
        )
    lines += ["", "| budget | peer | peer FID / ours |", "|---|---|---:|"]
    for k in args.budgets:
        ours = [r for r in rows if r["k"] == k and r["spec"] == "ours/default"]
        for r in rows:
            if ours and r["k"] == k and r["spec"] != "ours/default":
                lines.append(
                    f"| {k}B | {SYSTEMS[r['spec']][0]} | {r['fid'] / ours[0]['fid']:.2f} |"
                )
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(SYSTEMS[r["spec"]][1], []).append(
            (r["k"] * results["base_seconds"], r["fid"])
        )
    xs = [x for pts in series.values() for x, _ in pts]
    series["real-data floor"] = [(min(xs), floor["fid"]), (max(xs), floor["fid"])]
    title = f"{protocol['data']}: held-out FID (mean over seeds) vs wall-clock budget"
    chart = line_chart(series, title, "budget: wall seconds (log)", "FID")
    save_png(chart, out / "fid_vs_seconds.png")


if __name__ == "__main__":
    main()
