"""{UNet, DiT-S} x {EDM, flow matching} on the digits' held-out yardstick, each trained
for the default run's training time, and held-out FID against network evaluations (NFE)
for the flow samplers beside EDM's Heun sampler.

    python benchmarks/objectives_backbones.py [--seeds 0 1 2] [--nfe-seeds 0 1 2]

- Each system is ``python train.py data.val_fraction=0.5`` plus its overrides (the default
  run; ``objective=flow``: logit-normal t, flow_heun; ``model=dit_s``: DiT-S with patch 2,
  16 tokens on 8x8) with every default callback, in an empty cache.
- Equal training time: the UNet runs take the default 1,500 steps; the DiT runs
  1,500 x (UNet step time / DiT step time), both step times measured in this process
  (forward, backward and AdamW on a batch of 64) before training, with validation every
  third of the run as the default does, but without the in-training FID (``eval=null``:
  500 samples of 19 DiT calls would take several times the run's training). Each row
  reports its wall time.
- Scored as ``benchmarks/quality_vs_peer.py`` scores: ``heldout_report`` at N = 898 against
  the held-out half in ``digits_heldout`` features, with the run's sampler; 3 sample seeds
  for the UNet runs, ``--dit-seeds`` (seed 0) for the DiT runs, whose draws cost 24x more.
- FID against NFE: the UNet flow run with flow_euler and flow_heun at 4, 8, 16, 32 steps,
  the UNet EDM run with EDM Heun at the same step counts.
Results are kept in OUT/results.json (a rerun skips what is there); OUT/table.md,
OUT/fid_vs_nfe.png and 64-image grids, OUT = benchmarks/results/objectives_backbones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_vs_peer import ROOT, train_ours

from ddpm.data.datamodule import ImageDataModule
from ddpm.diffusion.samplers import EDMSampler, FlowSampler
from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.heldout import heldout_report
from ddpm.runs.build import load_module
from ddpm.utils.images import line_chart, make_grid, save_png, to_uint8

SYSTEMS = {  # name -> (table label, train.py overrides)
    "unet_edm": ("UNet (tiny), EDM: the default run", ()),
    "unet_flow": ("UNet (tiny), flow matching", ("objective=flow",)),
    "dit_edm": ("DiT-S/2, EDM", ("model=dit_s", "eval=null")),
    "dit_flow": ("DiT-S/2, flow matching", ("model=dit_s", "objective=flow", "eval=null")),
}
METRICS = ("fid", "precision", "recall", "memorisation")
STEPS = (4, 8, 16, 32)


def step_seconds(net: torch.nn.Module, batch: int = 64, repeats: int = 5) -> float:
    """Seconds of one training step of ``net`` (forward, backward, AdamW) on 8x8 digits."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 1, 8, 8), torch.rand(batch)
    for i in range(repeats + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        loss = net(x, t).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / repeats


def dit_steps(default_steps: int) -> tuple[int, float]:
    """The DiT runs' step count for the UNet's training time, and the step-time ratio."""
    from hydra.utils import instantiate

    def net(name: str) -> torch.nn.Module:
        cfg = OmegaConf.load(ROOT / "conf/model" / f"{name}.yaml")
        cfg.image_size, cfg.in_channels = 8, 1
        return instantiate(cfg)

    ratio = step_seconds(net("dit_s")) / step_seconds(net("tiny"))
    return max(3, round(default_steps / ratio)), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dit-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--nfe-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/objectives_backbones"
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs/objectives_backbones")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "evals": {}}

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    default_steps = int(OmegaConf.load(ROOT / "conf/trainer/default.yaml").max_steps)
    if "dit_steps" not in results:
        results["dit_steps"], results["dit_step_ratio"] = dit_steps(default_steps)
        save()
    for name, (_, overrides) in SYSTEMS.items():
        if name in results["runs"]:
            continue
        steps = results["dit_steps"] if name.startswith("dit") else default_steps
        extra = (*overrides, f"trainer.max_steps={steps}")
        extra += (f"trainer.val_check_interval={max(1, steps // 3)}",)
        results["runs"][name] = train_ours("digits", 1, args.runs / name, steps, extra)
        save()

    data = ImageDataModule(name="digits", image_size=8, val_fraction=0.5)
    extractor = build_feature_extractor("digits_heldout")
    evals = results["evals"]

    def evaluate(key: str, run: str, seed: int, sampler: object | None = None) -> None:
        if key in evals:
            return
        module = load_module(Path(results["runs"][run]["ckpt"]))
        used = sampler or module.sampler
        start = time.perf_counter()
        images = module.sample(args.num_samples, seed=seed, batch_size=500, sampler=used)
        seconds = time.perf_counter() - start
        report = heldout_report(images, data, extractor, "val")
        nfe = used.nfe(module.schedule, module.objective.prediction_type)
        evals[key] = {**report, "sampler": type(used).__name__, "nfe": nfe, "seconds": seconds}
        results["floor"] = report["floor"]
        print(key, json.dumps({m: round(report[m], 4) for m in METRICS}), flush=True)
        if seed == 0 and sampler is None:
            save_png(make_grid(to_uint8(images[:64])), args.out / f"grid_{run}.png")
        save()

    for name in SYSTEMS:
        for seed in args.dit_seeds if name.startswith("dit") else args.seeds:
            evaluate(f"{name}/default/seed{seed}", name, seed)
    for steps in STEPS:
        for seed in args.nfe_seeds:
            for solver in ("euler", "heun"):
                sampler = FlowSampler(steps=steps, solver=solver)
                evaluate(f"unet_flow/flow_{solver}-{steps}/seed{seed}", "unet_flow", seed, sampler)
            edm = EDMSampler(steps=steps)
            evaluate(f"unet_edm/edm_heun-{steps}/seed{seed}", "unet_edm", seed, edm)
    write_report(results, args)


def summary(results: dict, prefix: str) -> dict:
    """Mean and std over the seeds of the evaluations whose key starts with ``prefix/``."""
    found = [v for k, v in results["evals"].items() if k.rsplit("/", 1)[0] == prefix]
    row = {"seeds": len(found), "nfe": found[0]["nfe"], "sampler": found[0]["sampler"]}
    for m in METRICS:
        values = [f[m] for f in found]
        row[m], row[f"{m}_std"] = float(np.mean(values)), float(np.std(values))
    return row


def write_report(results: dict, args: argparse.Namespace) -> None:
    floor = results["floor"]
    lines = [
        f"Digits, held-out protocol (train on 899, score against the other 898 at N = 898 in "
        f"`digits_heldout` features). Floor: FID {floor['fid']:.2f}, precision "
        f"{floor['precision']:.3f}, recall {floor['recall']:.3f}. DiT-S/2 steps: "
        f"{results['dit_steps']} (its training step takes {results['dit_step_ratio']:.1f}x "
        "the tiny UNet's). Mean +- std over sample seeds.",
        "",
        "| system | sampler (NFE) | steps | train wall (s) | seeds | FID | FID / floor | "
        "precision | recall | memorisation |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (label, _) in SYSTEMS.items():
        run, r = results["runs"][name], summary(results, f"{name}/default")
        lines.append(
            f"| {label} | {r['sampler']} ({r['nfe']}) | {run['steps']} | {run['seconds']:.0f} | "
            f"{r['seeds']} | {r['fid']:.2f} +- {r['fid_std']:.2f} | {r['fid'] / floor['fid']:.2f} "
            f"| {r['precision']:.3f} +- {r['precision_std']:.3f} | {r['recall']:.3f} +- "
            f"{r['recall_std']:.3f} | {r['memorisation']:.3f} +- {r['memorisation_std']:.3f} |"
        )
    lines += [
        "",
        "| sampler | run | " + " | ".join(f"{s} steps" for s in STEPS) + " |",
        "|---|---|" + "---:|" * len(STEPS),
    ]
    series = {}
    for sampler, run in (
        ("flow_euler", "unet_flow"),
        ("flow_heun", "unet_flow"),
        ("edm_heun", "unet_edm"),
    ):
        rows = [summary(results, f"{run}/{sampler}-{s}") for s in STEPS]
        cells = [f"{r['fid']:.2f} ({r['nfe']} NFE)" for r in rows]
        lines.append(f"| {sampler} | {run} | " + " | ".join(cells) + " |")
        series[sampler] = [(r["nfe"], r["fid"]) for r in rows]
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)
    xs = [x for pts in series.values() for x, _ in pts]
    series["real-data floor"] = [(min(xs), floor["fid"]), (max(xs), floor["fid"])]
    chart = line_chart(series, "digits: held-out FID vs NFE", "NFE (log)", "FID")
    save_png(chart, args.out / "fid_vs_nfe.png")


if __name__ == "__main__":
    main()
