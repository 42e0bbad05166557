"""Classifier-free guidance on a class-conditional digits checkpoint: for each guidance
scale w, the share of samples the digits classifier assigns to the requested class, and
the FID of the class-balanced draw (digits features vs the training images).

    python train.py experiment=digits_cond hydra.run.dir=RUN
    python benchmarks/guidance.py --ckpt RUN/checkpoints/last.ckpt
    python benchmarks/guidance.py            # trains experiment=digits_cond first
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.evaluation.features import extract_features, load_digits_feature_net
from ddpm.evaluation.metrics import fid_kid
from ddpm.evaluation.reference import ReferenceStats
from ddpm.runs.build import load_module
from ddpm.utils.images import class_grid, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="class-conditional digits checkpoint")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt
    if ckpt is None:
        run_dir = args.out / "digits_cond_run"
        command = [
            sys.executable, str(ROOT / "train.py"), "experiment=digits_cond", "logger=none",
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    if not module.num_classes:
        raise SystemExit(f"error: {ckpt} is unconditional; train with experiment=digits_cond")
    data = instantiate(OmegaConf.create(module.hparams.config["data"]))
    classifier = load_digits_feature_net()
    reference = ReferenceStats.from_features(
        extract_features(classifier, data.split_images("train"))
    )

    labels = torch.tensor(module.labels_for(range(args.num_samples), None))  # i % classes
    rows = []
    for scale in args.scales:
        images = module.sample(
            args.num_samples, seed=args.seed, batch_size=args.batch_size, guidance_scale=scale
        )
        with torch.no_grad():
            predicted = classifier.logits(images).argmax(dim=1)
        accuracy = (predicted == labels).float().mean().item()
        fid = fid_kid(reference, extract_features(classifier, images))["fid"]
        rows.append({"guidance_scale": scale, "accuracy": accuracy, "fid": fid})
        save_png(
            class_grid(to_uint8(images[:100]), labels[:100].tolist()),
            args.out / f"grid_w{scale:g}.png",
        )
        print(f"w={scale:<4g} accuracy {accuracy:.3f}  FID {fid:.2f}", flush=True)

    table = (
        f"checkpoint `{ckpt}`; {args.num_samples} samples (class i % 10), seed {args.seed}, "
        f"sampler {type(module.sampler).__name__} {module.sampler.steps} steps; digits "
        f"classifier accuracy and digits-feature FID vs {reference.num_images} train images\n\n"
        "| guidance scale w | accuracy | FID |\n|---:|---:|---:|\n"
    ) + "".join(
        f"| {r['guidance_scale']:g} | {r['accuracy']:.3f} | {r['fid']:.2f} |\n" for r in rows
    )
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps({"ckpt": str(ckpt), "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
