"""FID against the EMA length, by post-hoc EMA (Karras et al. 2024) on one ema=power run.

    python benchmarks/ema_sweep.py RUN_DIR --stds 0.02,0.05,0.1,0.15,0.2
    python benchmarks/ema_sweep.py RUN_DIR --baseline OTHER_RUN/checkpoints/last.ckpt

Each std's EMA is rebuilt from RUN_DIR/ema_snapshots up to the checkpoint's step (default
RUN_DIR/checkpoints/last.ckpt), sampled with the checkpoint's own sampler (the same seed
for every row) and scored with the data's FID features against the train split. The
checkpoint's own weights (the run's first tracked std) and ``--baseline`` checkpoints
(e.g. an ema=standard run) are scored the same way beside them. Writes OUT/table.md,
OUT/results.json, OUT/fid_vs_ema_std.png and a 64-image grid per row; prints the best.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.features import extract_features
from ddpm.evaluation.metrics import fid_kid
from ddpm.evaluation.reference import data_reference
from ddpm.runs.build import load_module
from ddpm.runs.posthoc import posthoc_ema
from ddpm.training.module import DiffusionModule
from ddpm.training.posthoc_ema import check_sigma_rel
from ddpm.utils.images import line_chart, make_grid, save_png, to_uint8


def parse_stds(text: str) -> list[float]:
    """``0.02,0.05`` -> [0.02, 0.05]; a value outside (0, 0.3] stops with one line."""
    try:
        return [check_sigma_rel(float(s), "--stds") for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def ema_label(module: DiffusionModule) -> str:
    """What a checkpoint's weights are: ``ema_std 0.15``, ``EMA decay 0.995`` or ``raw``."""
    ema = (module.hparams.config.get("callbacks") or {}).get("ema") or {}
    if "stds" in ema:
        return f"ema_std {ema['stds'][0]:g}"
    return f"EMA decay {ema['decay']:g}" if "decay" in ema else "raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder trained with ema=power")
    parser.add_argument("--stds", default="0.02,0.05,0.08,0.1,0.12,0.15,0.2,0.25")
    parser.add_argument("--ckpt", type=Path, help="default: RUN_DIR/checkpoints/last.ckpt")
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="another checkpoint to score beside (repeatable)",
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/ema_sweep")
    args = parser.parse_args()
    stds = parse_stds(args.stds)
    ckpt = args.ckpt or args.run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"error: no checkpoint {ckpt}; name one with --ckpt")
    out = args.out or args.run_dir / "ema_sweep"
    out.mkdir(parents=True, exist_ok=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = load_module(ckpt)
    datamodule = instantiate(OmegaConf.create(module.hparams.config["data"]))
    extractor_name = datamodule.feature_extractor
    extractor = build_feature_extractor(extractor_name)
    _, reference = data_reference(datamodule, "train", extractor_name, extractor, device)

    def score(name: str, net: DiffusionModule, file: str | None = None) -> float:
        """FID of ``net``'s samples; their first 64 go to OUT/grid_{file or name}.png."""
        images = net.to(device).sample(args.num_samples, seed=args.seed, batch_size=args.batch_size)
        fid = fid_kid(reference, extract_features(extractor, images, device=device))["fid"]
        save_png(make_grid(to_uint8(images[:64])), out / f"grid_{file or name}.png")
        print(f"{name:24s} FID {fid:7.2f}", flush=True)
        return fid

    rows = [{"name": f"checkpoint ({ema_label(module)})", "fid": score("checkpoint", module)}]
    for i, path in enumerate(args.baseline):
        other = load_module(path)
        name = f"baseline {i} ({ema_label(other)})"
        rows.append({"name": name, "ckpt": str(path), "fid": score(f"baseline{i}", other)})
    sweep = []
    for std in stds:
        try:
            used = posthoc_ema(module.cpu(), ckpt, std)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        sweep.append(
            {
                "name": f"ema_std={std:g}",
                "ema_std": std,
                "step": used["step"],
                "fid": score(f"ema_std={std:g}", module, f"ema_std_{std:g}"),
            }
        )
    best = min(sweep, key=lambda r: r["fid"])

    header = (
        f"run `{args.run_dir}`, checkpoint `{ckpt}`; {args.num_samples} samples, seed "
        f"{args.seed}, the checkpoint's sampler ({type(module.sampler).__name__}), "
        f"{extractor_name} features vs {reference.num_images} train images\n\n"
        "| weights | FID |\n|---|---:|\n"
    )
    table = header + "".join(
        f"| {r['name']}{' (' + r['ckpt'] + ')' if 'ckpt' in r else ''} | {r['fid']:.2f} |\n"
        for r in rows + sweep
    )
    table += f"\nbest: ema_std={best['ema_std']:g} (FID {best['fid']:.2f})\n"
    (out / "table.md").write_text(table)
    results = {"run_dir": str(args.run_dir), "ckpt": str(ckpt), "rows": rows + sweep, "best": best}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    series = {"post-hoc EMA": [(r["ema_std"], r["fid"]) for r in sweep]}
    for r in rows:  # flat lines across the swept range
        series[r["name"]] = [(stds[0], r["fid"]), (stds[-1], r["fid"])]
    chart = line_chart(series, "FID vs EMA length", "ema_std (sigma_rel)", "FID", log_x=False)
    save_png(chart, out / "fid_vs_ema_std.png")
    print(table)


if __name__ == "__main__":
    main()
