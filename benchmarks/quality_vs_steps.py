"""Sample quality against sampling cost: FID (digits features) and wall-clock per image
for several samplers and step counts on one checkpoint.

    python benchmarks/quality_vs_steps.py --ckpt RUN/checkpoints/last.ckpt
    python benchmarks/quality_vs_steps.py            # trains the default digits run first
    python benchmarks/quality_vs_steps.py --ckpt C ddim-20:spacing=leading dpm_solver-10

A spec is SAMPLER-STEPS[:key=value,...]; SAMPLER is a file of conf/sampler/, whose values
are the defaults. Writes OUT/table.md, OUT/results.json, OUT/fid_vs_nfe.png and one
64-image grid per spec.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.features import extract_features
from ddpm.evaluation.metrics import fid_kid
from ddpm.evaluation.reference import data_reference
from ddpm.runs.build import load_module
from ddpm.utils.images import line_chart, make_grid, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]
# EDM's stochastic settings for ImageNet-64 (NVlabs/edm README: --S_churn=40 --S_min=0.05
# --S_max=50 --S_noise=1.003, there with 256 steps)
CHURN = "s_churn=40,s_min=0.05,s_max=50,s_noise=1.003"
DEFAULT_SPECS = [
    "ddpm-1000",
    "ddpm-250",
    "ddim-10",
    "ddim-20",
    "ddim-50",
    "ddim-100",
    "dpm_solver-10",
    "dpm_solver-20",
    *[f"edm-{n}" for n in (5, 10, 18)],
    *[f"edm-{n}:{CHURN}" for n in (5, 10, 18)],
    *[f"edm-{n}:clip_denoised=true" for n in (5, 10, 18)],
    "edm-18:clip_denoised=true,sigma_to_t=nearest",
    *[f"edm-{n}:clip_denoised=true,{CHURN}" for n in (10, 18)],
]


def build_sampler(spec: str) -> object:
    """``ddim-20:spacing=leading,eta=0.5`` -> the configured sampler object."""
    head, _, extra = spec.partition(":")
    name, _, steps = head.rpartition("-")
    path = ROOT / "conf" / "sampler" / f"{name}.yaml"
    if not path.is_file() or not steps.isdigit():
        raise SystemExit(f"error: bad spec {spec!r}; use SAMPLER-STEPS[:key=value,...]")
    cfg = OmegaConf.load(path)
    cfg.steps = int(steps)
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        OmegaConf.update(cfg, key, OmegaConf.create(f"v: {value}").v)
    return instantiate(cfg)


def series_name(spec: str) -> str:
    """A short legend name: ``edm-18:clip_denoised=true,s_churn=40,...`` -> ``edm+clip+churn``."""
    head, _, extra = spec.partition(":")
    tags = []
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        if key in ("s_min", "s_max", "s_noise"):
            continue  # part of the churn settings
        tags.append({"clip_denoised": "clip", "s_churn": "churn"}.get(key, value))
    return "+".join([re.sub(r"-\d+$", "", head), *tags])


def file_name(spec: str) -> str:
    """The spec as a portable file name (no ':' or ',')."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def train_default(run_dir: Path) -> Path:
    """Train ``python train.py`` (the default digits run) into ``run_dir``."""
    command = [sys.executable, str(ROOT / "train.py"), "logger=none", f"hydra.run.dir={run_dir}"]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return run_dir / "checkpoints" / "last.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    parser.add_argument("--ckpt", type=Path, help="digits checkpoint (default: train one)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_vs_steps"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt or train_default(args.out / "default_run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = load_module(ckpt).to(device)
    data_cfg = module.hparams.config["data"]
    datamodule = instantiate(OmegaConf.create(data_cfg))
    extractor_name = datamodule.feature_extractor
    extractor = build_feature_extractor(extractor_name)
    _, reference = data_reference(datamodule, "train", extractor_name, extractor, device)
    prediction_type = module.objective.prediction_type

    rows = []
    for spec in args.specs:
        sampler = build_sampler(spec)
        nfe = sampler.nfe(module.schedule, prediction_type)
        start = time.perf_counter()
        images = module.sample(
            args.num_samples, seed=args.seed, batch_size=args.batch_size, sampler=sampler
        )
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        metrics = fid_kid(reference, extract_features(extractor, images, device=device))
        save_png(make_grid(to_uint8(images[:64])), args.out / f"grid_{file_name(spec)}.png")
        row = {
            "spec": spec,
            "nfe": nfe,
            "fid": metrics["fid"],
            "ms_per_image": 1e3 * seconds / len(images),
        }
        rows.append(row)
        print(
            f"{spec:32s} NFE {nfe:5d}  FID {row['fid']:7.2f}  {row['ms_per_image']:8.2f} ms/image",
            flush=True,
        )

    schedule = module.hparams.config["schedule"]
    header = (
        f"checkpoint `{ckpt}` ({schedule['name']} schedule, {prediction_type} prediction); "
        f"{args.num_samples} samples, seed {args.seed}, {extractor_name} features vs "
        f"{reference.num_images} train images; {device}, {torch.get_num_threads()} threads\n\n"
        "| sampler | NFE | FID | ms / image |\n|---|---:|---:|---:|\n"
    )
    table = header + "".join(
        f"| {r['spec']} | {r['nfe']} | {r['fid']:.2f} | {r['ms_per_image']:.2f} |\n" for r in rows
    )
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps({"ckpt": str(ckpt), "rows": rows}, indent=2))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(series_name(r["spec"]), []).append((r["nfe"], r["fid"]))
    cap = 4 * min(r["fid"] for r in rows)  # a sampler that fails must not flatten the rest
    title = f"FID vs network evaluations (FID above {cap:.0f} drawn at the top)"
    chart = line_chart(series, title, "NFE (log)", "FID", y_max=cap)
    save_png(chart, args.out / "fid_vs_nfe.png")
    print(table)


if __name__ == "__main__":
    main()
