"""Autoguidance and EDM2's learned loss weighting on the digits, held-out protocol.

    python benchmarks/autoguidance.py             # w 1.5-3 by T/16, T/8, T/4 and the small net
    python benchmarks/autoguidance.py --weights 1.1 1.2 1.3 --own-sixteenths 4 8 \
        --guide-stds 0.05 0.15 0.25               # more rows into the same results.json
    python benchmarks/autoguidance.py --timing    # draw times alone (on a quiet machine)
    python benchmarks/autoguidance.py --table     # rewrite table.md from results.json

Trains (in WORKDIR, each once; a rerun reuses them) the default run on the train half
(`python train.py data.val_fraction=0.5`), the same with `objective.learned_weighting=true`,
and the guide recipe (`experiment=guide`: half the width, a quarter of the steps). Then
draws 1,000 samples per seed with the default sampler (EDM Heun, 10 steps, 19 NFE):
- unguided, and unguided with more Heun steps (equal NFE / equal sampling time);
- guided (`guide_weight` w, `guide_ema_std` S) by the run's own EMA at k T/16
  (`guide_step`) and by the smaller net (`guide_ckpt`);
- the learned-weighting run unguided.
Every draw is scored by `heldout_report` (the other half, `digits_heldout` features, equal
N, the floor beside it) as `sample.py evaluate=true reference_split=val` does, on the
uint8-quantised images; a draw already in results.json is not drawn again. Writes
OUT/results.json, OUT/table.md, grids and the learned u(sigma) against its optimum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.heldout import first_rows, heldout_report
from ddpm.runs.build import load_module
from ddpm.runs.guide import load_guide
from ddpm.training.module import DiffusionModule
from ddpm.utils.images import line_chart, make_grid, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name -> train.py overrides (all on the train half)
    "main": [],
    "learned": ["objective.learned_weighting=true"],
    "guide_small": ["experiment=guide"],
}


def train(workdir: Path, name: str, seed: int | None = None) -> dict[str, Any]:
    """Train run ``name`` (with training ``seed`` when given; the default run's is 42) in
    workdir once and return its wall time and checkpoint."""
    run = workdir / (name if seed is None else f"{name}_seed{seed}")
    done = run / "wall.json"
    if done.exists():
        return json.loads(done.read_text())
    command = [sys.executable, str(ROOT / "train.py"), "data.val_fraction=0.5", *RUNS[name]]
    command += [] if seed is None else [f"seed={seed}"]
    command.append(f"hydra.run.dir={run}")
    env = {**os.environ, "WANDB_MODE": "offline"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    info = {
        "wall_s": round(time.perf_counter() - start, 1),
        "ckpt": str(run / "checkpoints/last.ckpt"),
    }
    done.write_text(json.dumps(info))
    return info


def guide_for(
    ckpt: Path, source: Path, step: int | None, std: float, main: DiffusionModule
) -> tuple[DiffusionModule, dict[str, Any]]:
    """The guide sample.py would build for these values (ddpm.runs.guide.load_guide)."""
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(ckpt),
            "guide_ckpt": str(source),
            "guide_step": step,
            "guide_ema_std": std,
            "guide_weight": 2.0,
        }
    )
    guide, record = load_guide(cfg, main)
    return guide, record


class Scorer:
    """Draws and scores as sample.py evaluate=true reference_split=val does."""

    def __init__(self, module: DiffusionModule, num_samples: int) -> None:
        self.datamodule = instantiate(OmegaConf.create(module.hparams.config["data"]))
        self.extractor = build_feature_extractor("digits_heldout")
        self.num_samples = num_samples

    def draw(self, module: DiffusionModule, seed: int, **kwargs: Any) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images = module.sample(
            range(self.num_samples), seed=seed, batch_size=self.num_samples, **kwargs
        )
        seconds = time.perf_counter() - start
        quantised = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return quantised, seconds  # [N, C, H, W] in [-1, 1], as sample.py scores them

    def score(self, images: torch.Tensor) -> dict[str, Any]:
        report = heldout_report(images, self.datamodule, self.extractor, "val", "cpu")
        keys = ("fid", "precision", "recall", "memorisation", "n")
        return {**{k: report[k] for k in keys}, "floor": report["floor"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autoguidance"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/autoguidance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--guide-stds", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument(
        "--own-sixteenths",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="guides from the run's own EMA at k T/16 (1 2 4: T/16, T/8, T/4)",
    )
    parser.add_argument("--grid-weights", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="*",
        default=[],
        help="more training seeds (fixed and learned weighting)",
    )
    parser.add_argument("--table", action="store_true", help="only rewrite OUT/table.md")
    parser.add_argument(
        "--timing", action="store_true", help="only time the draws (a quiet machine), 3 repeats"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        write_table(json.loads((args.out / "results.json").read_text()), args.out)
        return
    walls = {name: train(args.workdir, name) for name in RUNS}
    for seed in args.train_seeds:  # the fixed and the learned weighting, another seed
        for name in ("main", "learned"):
            walls[f"{name}_seed{seed}"] = train(args.workdir, name, seed)
    results_file = args.out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    results = {"train": walls, "draws": saved.get("draws", [])}
    done = {(r["name"], r["seed"]) for r in results["draws"]}

    ckpt = Path(walls["main"]["ckpt"])
    main_module = load_module(ckpt)
    learned = load_module(walls["learned"]["ckpt"])
    scorer = Scorer(main_module, args.num_samples)
    total = int(main_module.hparams.config["trainer"]["max_steps"])
    sampler = main_module.sampler
    base_steps = sampler.steps

    def record(
        name: str,
        seed: int,
        module: DiffusionModule,
        extra: dict[str, Any],
        grid: bool = False,
        **kwargs: Any,
    ) -> None:
        if (name, seed) in done:
            return
        images, seconds = scorer.draw(module, seed, **kwargs)
        row = {
            "name": name,
            "seed": seed,
            "draw_s": round(seconds, 2),
            **extra,
            **scorer.score(images),
        }
        print(json.dumps({k: v for k, v in row.items() if k != "floor"}), flush=True)
        results["draws"].append(row)
        done.add((name, seed))
        results_file.write_text(json.dumps(results, indent=1))
        if grid and seed == args.seeds[0]:
            slug = name.replace("/", "").replace("=", "").replace(" ", "_")
            save_png(make_grid(to_uint8(images[:64])), args.out / f"grid_{slug}.png")

    if args.timing:
        small = Path(walls["guide_small"]["ckpt"])
        timing(
            scorer,
            main_module,
            [guide_for(ckpt, s, n, 0.05, main_module)[0] for s, n in ((ckpt, 94), (small, None))],
            args.out,
        )
        return
    other_seeds = {  # the fixed and the learned weighting trained with other seeds
        (name, seed): load_module(walls[f"{run}_seed{seed}"]["ckpt"])
        for seed in args.train_seeds
        for name, run in (("unguided", "main"), ("learned_weighting", "learned"))
    }
    for seed in args.seeds:
        nfe = sampler.nfe(main_module.schedule)
        unguided = {"guide": None, "weight": 1.0, "steps": base_steps, "nfe": nfe}
        for name, module in (("unguided", main_module), ("learned_weighting", learned)):
            record(name, seed, module, unguided, grid=True)
        for (name, train_seed), module in other_seeds.items():
            record(f"{name} (train seed {train_seed})", seed, module, unguided)
        for steps in (13, 15, 20):  # equal NFE (20 steps: 39 vs 38) and equal time
            sampler.steps = steps
            record(
                f"unguided_{steps}steps",
                seed,
                main_module,
                {
                    "guide": None,
                    "weight": 1.0,
                    "steps": steps,
                    "nfe": sampler.nfe(main_module.schedule),
                },
            )
        sampler.steps = base_steps
    every = -(-total // 16)  # the snapshot interval: T/16 (T/4 = 376 of 1,500, a snapshot)
    guides = [
        (f"own_T/{16 // k}" if 16 % k == 0 else f"own_{k}T/16", ckpt, every * k)
        for k in args.own_sixteenths
    ]
    guides.append(("small_net", Path(walls["guide_small"]["ckpt"]), None))
    for label, source, step in guides:
        for std in args.guide_stds:
            guide, info = guide_for(ckpt, source, step, std, main_module)
            for weight in args.weights:
                name = f"{label} std={std:g} w={weight:g}"
                extra = {
                    "guide": label,
                    "guide_step": info.get("step", info["ckpt_step"]),
                    "guide_ema_std": std,
                    "weight": weight,
                    "steps": base_steps,
                    "nfe": 2 * sampler.nfe(main_module.schedule),
                }
                for seed in args.seeds:
                    record(
                        name,
                        seed,
                        main_module,
                        extra,
                        grid=weight in args.grid_weights,
                        guide=guide,
                        guide_weight=weight,
                    )
    write_curve(learned, scorer.datamodule, args.out)
    write_table(results, args.out)
    print(f"wrote {results_file}")


def write_table(results: dict[str, Any], out: Path) -> None:
    """OUT/table.md: per draw, FID per seed, its mean, the paired difference to the
    unguided draw on the same seeds, and the means of precision, recall, memorisation."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in results["draws"]:
        rows.setdefault(row["name"], []).append(row)
    base = {r["seed"]: r["fid"] for r in rows["unguided"]}
    floor = results["draws"][0]["floor"]
    lines = [
        f"Floor (train half at N = {results['draws'][0]['n']}): FID {floor['fid']:.2f}, "
        f"precision {floor['precision']:.3f}, recall {floor['recall']:.3f}.",
        "",
        "| draw | NFE | FID per seed | mean | vs unguided | precision | recall | memorisation |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, group in rows.items():
        group = sorted(group, key=lambda r: r["seed"])
        fids = [r["fid"] for r in group]
        diff = sum(r["fid"] - base[r["seed"]] for r in group) / len(group)

        def mean(key: str, group: list[dict[str, Any]] = group) -> float:
            return sum(r[key] for r in group) / len(group)

        lines.append(
            f"| {name} | {group[0]['nfe']} | {', '.join(f'{f:.2f}' for f in fids)} | "
            f"{sum(fids) / len(fids):.2f} | {diff:+.2f} | {mean('precision'):.3f} | "
            f"{mean('recall'):.3f} | {mean('memorisation'):.3f} |"
        )
    lines += ["", *weight_matrix(rows, base)]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def weight_matrix(rows: dict[str, list[dict[str, Any]]], base: dict[int, float]) -> list[str]:
    """One row per guide and guide EMA length, one column per w: the mean FID and, in
    brackets, its mean paired difference to the unguided draw (the seeds each row has)."""
    cells: dict[tuple[str, float], dict[float, str]] = {}
    for group in rows.values():
        first = group[0]
        if first["guide"] is None:
            continue
        fid = sum(r["fid"] for r in group) / len(group)
        diff = sum(r["fid"] - base[r["seed"]] for r in group) / len(group)
        key = (first["guide"], first["guide_ema_std"])
        cells.setdefault(key, {})[first["weight"]] = f"{fid:.2f} ({diff:+.2f})"
    weights = sorted({w for row in cells.values() for w in row})
    lines = [
        "| guide (step) | guide_ema_std | " + " | ".join(f"w={w:g}" for w in weights) + " |",
        "|---|---:|" + "---:|" * len(weights),
    ]
    steps = {(r[0]["guide"]): r[0]["guide_step"] for r in rows.values() if r[0]["guide"]}
    order = sorted(cells, key=lambda k: (k[0] == "small_net", steps[k[0]], k[1]))
    for guide, std in order:
        row = cells[(guide, std)]
        values = " | ".join(row.get(w, "") for w in weights)
        lines.append(f"| {guide} ({steps[guide]}) | {std:g} | {values} |")
    return lines


def timing(
    scorer: Scorer, module: DiffusionModule, guides: list[DiffusionModule], out: Path
) -> None:
    """Median seconds of a 1,000-sample draw (3 repeats, seed 0): unguided at 10-20 Heun
    steps, guided at 10 by a guide of the main net's size and by the smaller net."""
    sampler, rows = module.sampler, []
    base = sampler.steps
    cases = [(f"unguided {k} steps", k, None) for k in (10, 12, 13, 14, 15, 20)]
    cases += [("guided by a same-size guide, 10 steps", base, guides[0])]
    cases += [("guided by the smaller net, 10 steps", base, guides[1])]
    for label, steps, guide in cases:
        sampler.steps = steps
        times = sorted(scorer.draw(module, 0, guide=guide, guide_weight=2.0)[1] for _ in range(3))
        nfe = sampler.nfe(module.schedule) * (2 if guide is not None else 1)
        rows.append({"draw": label, "steps": steps, "nfe": nfe, "seconds": round(times[1], 2)})
        print(json.dumps(rows[-1]), flush=True)
    sampler.steps = base
    (out / "timing.json").write_text(json.dumps(rows, indent=1))


@torch.no_grad()
def write_curve(module: DiffusionModule, datamodule: Any, out: Path) -> None:
    """The learned u(sigma) over the training range of sigma, beside its closed-form
    optimum u*(sigma) = ln(lambda(sigma) E||D(y + n; sigma) - y||^2) (EDM2 Eq. 21's
    minimiser), measured with the same run's net on 512 held-out digits."""
    pre = module.objective.preconditioning
    lo, hi = pre.log_sigma_range()
    log_sigma = torch.linspace(lo, hi, 25, dtype=torch.float64)
    sigma = log_sigma.exp().float()
    u = module.loss_weighting.eval()(sigma)
    images = first_rows(datamodule, "val", 512, lambda x: x)  # [512, C, H, W] in [-1, 1]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    best = []
    for s in sigma:
        level = s.expand(len(images))
        denoised = pre.denoise(module.net.eval(), images + noise * s, level)
        err = (denoised - images).flatten(1).pow(2).mean(1).mean()  # [B, ...] -> scalar
        best.append(float((pre.weight(s.view(1)) * err).log()))
    curve = {"ln_sigma": log_sigma.tolist(), "u": u.tolist(), "u_star": best}
    (out / "learned_weighting.json").write_text(json.dumps(curve, indent=1))
    x = sigma.tolist()
    chart = line_chart(
        {
            "learned u": list(zip(x, u.tolist(), strict=True)),
            "u* = ln(lambda E err)": list(zip(x, best, strict=True)),
        },
        title="EDM2 learned loss weighting, digits",
        x_label="sigma",
        y_label="u(sigma)",
    )
    save_png(chart, out / "learned_weighting.png")


if __name__ == "__main__":
    main()
