"""``sample.py``'s work: check its values and load the checkpoint (``prepare_sample``,
which writes nothing), then draw the images on one or many devices (``draw``, through
``ddpm.runs.draw``) and write the outputs and metrics (``ddpm.runs.draw_report``)."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.diffusion.samplers.base import Sampler
from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.heldout import MAX_IMAGES, heldout_report
from ddpm.evaluation.metrics import load_reference
from ddpm.evaluation.reference import file_reference
from ddpm.runs.build import load_module
from ddpm.runs.draw import ChunkPlan, ChunkWriter, Drawer, DrawSpec
from ddpm.runs.draw_files import check_manifest
from ddpm.runs.draw_report import (
    equal_n_line,
    evaluate_draw,
    first_samples,
    write_json,
    write_outputs,
)
from ddpm.runs.errors import UsageError
from ddpm.runs.guide import load_guide
from ddpm.runs.posthoc import checkpoint_step, posthoc_ema
from ddpm.runs.prepare import check_writable
from ddpm.training.module import DiffusionModule
from ddpm.training.posthoc_ema import check_sigma_rel


@dataclass
class SamplePlan:
    """What ``sample`` draws with: the checkpoint's module, a sampler, guidance, the
    feature extractor (``evaluate=true``) and what names the draw in ``out_dir``."""

    module: DiffusionModule
    sampler: Sampler | None
    guidance: float
    identity: dict[str, Any]
    posthoc: dict[str, Any] | None = None  # ema_std's reconstruction: std, step, snapshots
    extractor: torch.nn.Module | None = None
    extractor_name: str | None = None
    guide: DiffusionModule | None = None  # autoguidance's weaker model (ddpm.runs.guide)
    guide_record: dict[str, Any] | None = None  # what it is: checkpoint, step, EMA, weight

    @property
    def guide_weight(self) -> float:
        return float(self.guide_record["weight"]) if self.guide_record else 1.0

    def nfe(self) -> int:
        """Network evaluations per sample: the sampler's, doubled by classifier-free
        guidance (a batch of two) and again by autoguidance (two networks)."""
        used = self.sampler or self.module.sampler
        calls = used.nfe(self.module.schedule, self.module.objective.prediction_type)
        return calls * (2 if self.guidance else 1) * (2 if self.guide_weight != 1.0 else 1)


_POSITIVE = {"num_samples": 1, "batch_size": 1, "seed": 0, "chunk_size": 1, "seed_blocks": 1}
_DEFAULTS = {"chunk_size": 500, "seed_blocks": 1, "save_png": True}  # conf/sample.yaml's


def prepare_sample(cfg: DictConfig) -> SamplePlan:
    """Check ``sample.py``'s values and load the checkpoint (writes nothing). Keys of
    conf/sample.yaml that a hand-made ``cfg`` lacks take their defaults."""
    if cfg.get("ckpt_path") is None:
        raise UsageError("ckpt_path is required: python sample.py ckpt_path=path/to/last.ckpt")
    with open_dict(cfg):
        for key, value in _DEFAULTS.items():
            cfg.setdefault(key, value)
    for key, low in _POSITIVE.items():
        value = cfg.get(key)
        if key == "batch_size" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(
                f"{key}={value!r} is not allowed: it must be an integer >= {low}"
                + (" (or null for a whole chunk at once)" if key == "batch_size" else "")
            )
    ema_std = cfg.get("ema_std")
    if ema_std is not None:
        check_sigma_rel(ema_std)
    trainer_settings(cfg)  # a bad device: refused now
    if cfg.get("fid_reference") is not None and not cfg.get("evaluate"):
        raise UsageError("fid_reference is only read with evaluate=true: add evaluate=true")
    out = Path(cfg.out_dir)
    check_writable(out)
    module = load_module(cfg.ckpt_path)
    step = checkpoint_step(Path(cfg.ckpt_path))
    posthoc = (
        posthoc_ema(module, Path(cfg.ckpt_path), ema_std, step) if ema_std is not None else None
    )
    guide, guide_record = load_guide(cfg, module)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    if sampler is not None:
        sampler.check_objective(module.objective)  # e.g. a flow sampler on an EDM net
    guidance = cfg.get("guidance_scale")
    if guidance is None and guide is not None:  # autoguidance instead of classifier-free
        guidance = 0.0
    if guidance is None:  # the scale the run's grids used (0 for unconditional runs)
        stored = module.hparams.config.get("callbacks") or {}
        guidance = (stored.get("sample_grid") or {}).get("guidance_scale") or 0.0
        guidance = guidance if module.num_classes else 0.0
    labels = module.labels_for(range(1), cfg.get("class_label"), guidance)  # checks them
    plan = SamplePlan(module, sampler, guidance, {}, posthoc)
    plan.guide, plan.guide_record = guide, guide_record
    plan.identity = draw_identity(cfg, plan, step, labels is not None)
    check_manifest(out, plan.identity)
    if cfg.get("evaluate"):
        config = module.hparams.config
        plan.extractor_name = cfg.get("feature_extractor") or config["data"]["feature_extractor"]
        plan.extractor = build_feature_extractor(plan.extractor_name)
        if cfg.get("fid_reference") is not None:  # a file that does not fit: refused now
            reference = Path(cfg.fid_reference)
            file_reference(reference, plan.extractor_name, plan.extractor, note=False)
    return plan


def draw_identity(
    cfg: DictConfig, plan: SamplePlan, step: int, conditional: bool
) -> dict[str, Any]:
    """What determines the images of a draw; ``out_dir/draw.json`` records it, and a rerun
    continues the draw only when it is the same."""
    ckpt = Path(cfg.ckpt_path).resolve()
    used = plan.sampler or plan.module.sampler
    guide = plan.guide_record
    named = ("ckpt_path", "ckpt_step", "guide_step", "guide_ema_std", "weight")
    return ({"guide": {k: guide[k] for k in named}} if guide else {}) | {
        "ckpt_path": str(ckpt),
        "ckpt_step": int(step),
        "ckpt_bytes": ckpt.stat().st_size,
        "num_samples": int(cfg.num_samples),
        "seed_blocks": int(cfg.seed_blocks),
        "seed": int(cfg.seed),
        "chunk_size": int(cfg.chunk_size),
        "class_label": cfg.get("class_label") if conditional else None,
        "guidance_scale": float(plan.guidance),
        "ema_std": cfg.get("ema_std"),
        "sampler": sampler_record(used),
    }


def sampler_record(sampler: Sampler) -> dict[str, Any]:
    """The sampler's class and settings (JSON-ready)."""
    settings = {k: v for k, v in vars(sampler).items() if not k.startswith("_")}
    return json.loads(json.dumps({"name": type(sampler).__name__, **settings}, default=str))


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """accelerator, devices, num_nodes and strategy of the sampling Trainer; ``device``
    (cpu, cuda, cuda:K, mps) is the one-device shorthand that overrides them."""
    device = cfg.get("device")
    settings = {
        "accelerator": cfg.get("accelerator") or "auto",
        "devices": cfg.get("devices") or 1,
        "num_nodes": int(cfg.get("num_nodes") or 1),
        "strategy": cfg.get("strategy") or "auto",
    }
    if device is not None:
        kind, _, index = str(device).partition(":")
        accelerator = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}.get(kind)
        if accelerator is None:
            raise UsageError(f"device={device!r} is unknown; use cpu, cuda, cuda:K or mps")
        devices = [int(index)] if index.isdigit() else 1
        settings |= {"accelerator": accelerator, "devices": devices, "num_nodes": 1}
    return settings


def draw(cfg: DictConfig, plan: SamplePlan) -> Path:
    """Draw ``num_samples`` x ``seed_blocks`` images as ``plan`` says, on the devices
    ``cfg`` names, into ``cfg.out_dir`` (continuing a draw already there); rank 0 then
    writes grid.png, samples/*.png, samples.npz, samples.json (and metrics.json with
    ``evaluate=true``). Returns the output folder."""
    start = time.perf_counter()
    module, out = plan.module, Path(cfg.out_dir)
    num_samples, blocks = int(cfg.num_samples), int(cfg.seed_blocks)
    spec = DrawSpec(
        out=out,
        total=num_samples * blocks,
        chunk_size=int(cfg.chunk_size),
        seed=int(cfg.seed),
        batch_size=cfg.get("batch_size"),
        class_label=cfg.get("class_label"),
        guidance=plan.guidance,
        save_png=bool(cfg.save_png),
        identity=plan.identity,
    )
    channels, height, width = module.image_shape
    writer = ChunkWriter(spec, bool(module.num_classes), plan.extractor is not None)
    trainer = L.Trainer(
        **trainer_settings(cfg),
        precision="32-true",
        logger=False,
        callbacks=[writer],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,  # rank 0 prints the sampler's steps and a line per chunk
        use_distributed_sampler=False,
        default_root_dir=out,
    )
    chunks = ChunkPlan(spec, (height, width, channels))
    drawer = Drawer(module, spec, plan.sampler, plan.extractor, plan.guide, plan.guide_weight)
    with warnings.catch_warnings():  # a finished draw run again has nothing left to draw
        warnings.filterwarnings("ignore", message=".*`DataLoader` across ranks is zero.*")
        trainer.predict(drawer, datamodule=chunks, return_predictions=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank is past its last gather; leaving the group now (rather than in the
        # interpreter's teardown, which can abort and make the launcher kill rank 0
        # while it writes) lets the other ranks exit cleanly
        trainer.strategy.barrier("draw_done")
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:  # rank 0 writes everything else
        return out
    write_outputs(spec, (height, width, channels))
    info = {
        "ckpt_path": str(cfg.ckpt_path),
        "num_samples": num_samples,
        "seed_blocks": blocks,
        "seed": int(cfg.seed),
        "class_label": cfg.get("class_label"),
        "guidance_scale": plan.guidance,
        "posthoc_ema": plan.posthoc,
        "sampler": plan.identity["sampler"],
        "guide": plan.guide_record,
        "nfe": plan.nfe(),
        "devices": trainer.world_size,
        "resumed_samples": chunks.resumed,
    }
    write_json(out / "samples.json", info)
    if plan.extractor is not None:
        report = _evaluate(cfg, plan, spec, num_samples, drawer.device)
        report["wall_seconds"] = round(time.perf_counter() - start, 2)
        write_json(out / "metrics.json", {**report, **info})
    print(f"wrote {spec.total} samples to {out} ({time.perf_counter() - start:.1f} s)")
    return out


def _evaluate(
    cfg: DictConfig, plan: SamplePlan, spec: DrawSpec, num_samples: int, device: torch.device
) -> dict[str, Any]:
    """metrics.json's numbers: FID/KID per block against the data's split or the file."""
    config = plan.module.hparams.config
    datamodule = instantiate(OmegaConf.create(config["data"]))
    reference, described = load_reference(
        datamodule,
        plan.extractor_name,
        plan.extractor,
        cfg.reference_split,
        cfg.get("fid_reference"),
        device,
    )
    report = evaluate_draw(spec, num_samples, reference, plan.extractor, device)
    if cfg.get("fid_reference") is None:  # a statistics file holds no images to compare
        samples = first_samples(spec, min(num_samples, MAX_IMAGES))
        equal = heldout_report(samples, datamodule, plan.extractor, cfg.reference_split, device)
        report |= {k: equal[k] for k in ("precision", "recall", "memorisation")}
        report["equal_n"] = equal
        print(equal_n_line(equal, plan.extractor_name))
    kid = report["kid_mean"]
    spread = (
        f"±{report['fid_std']:.3f} over {report['seed_blocks']} blocks "
        if report["fid_std"] is not None
        else ""
    )
    print(
        f"fid={report['fid']:.3f} {spread}"
        + (f"kid={kid:.4g}±{report['kid_std']:.2g} " if kid is not None else "")
        + f"({plan.extractor_name} features, {num_samples} samples vs "
        f"{described['num_images']} reference images)"
    )
    return {**report, "feature_extractor": plan.extractor_name, "reference": described}
