"""``sample.py`` on one or many devices through Lightning's ``Trainer.predict``.

The unit of work is a chunk of consecutive sample indices (``draw_files``). Rank 0 finds
the chunks still missing in ``out_dir`` and broadcasts the list; rank r draws every W-th
of them (W processes), each chunk with the same batches whatever W is, and every sample
from its own generator: the images are those one process draws, bit for bit on a CPU.
After each step the ranks' chunks are gathered and rank 0 alone writes them, so the
output is one folder and no sample is held longer than its chunk.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ddpm.diffusion.samplers.base import Sampler
from ddpm.evaluation.features import extract_features
from ddpm.runs.draw_files import (
    chunk_range,
    finished_chunks,
    num_chunks,
    png_name,
    save_chunk,
    write_manifest,
)
from ddpm.training.module import DiffusionModule
from ddpm.utils.images import save_png, to_uint8


@dataclass
class DrawSpec:
    """What is drawn: ``total`` indices of ``seed`` in chunks of ``chunk_size``."""

    out: Path
    total: int
    chunk_size: int
    seed: int
    batch_size: int | None
    class_label: int | None
    guidance: float
    save_png: bool
    identity: dict[str, Any]


class ChunkPlan(L.LightningDataModule):
    """This rank's chunks: rank 0 lists the missing ones, every rank gets the same list,
    rank r takes every W-th (padded with -1, "nothing", so all ranks step together)."""

    def __init__(self, spec: DrawSpec, image_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.spec, self.image_shape = spec, image_shape
        self.missing: list[int] = []
        self.resumed = 0

    def setup(self, stage: str) -> None:
        spec, trainer = self.spec, self.trainer
        plan: tuple[list[int], int] = ([], 0)
        if trainer.is_global_zero:
            done, notes = finished_chunks(spec.out, spec.total, spec.chunk_size, self.image_shape)
            for note in notes:
                print(f"note: {note}")
            write_manifest(spec.out, spec.identity)
            finished = set(done)
            todo = [k for k in range(num_chunks(spec.total, spec.chunk_size)) if k not in finished]
            plan = (todo, sum(len(chunk_range(k, spec.chunk_size, spec.total)) for k in done))
            if done:
                print(
                    f"continuing the draw in {spec.out}: {plan[1]} of {spec.total} samples "
                    f"are there, {len(todo)} chunks to draw"
                )
        self.missing, self.resumed = trainer.strategy.broadcast(plan, src=0)

    def predict_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        steps = math.ceil(len(self.missing) / world)
        mine = [*self.missing[rank::world]]
        mine += [-1] * (steps - len(mine))  # [steps]: every rank takes the same number
        return DataLoader(mine, batch_size=None, shuffle=False)


class Drawer(L.LightningModule):
    """Draws one chunk per ``predict_step``: uint8 images (and labels, and features of the
    quantised images with an extractor), padded to ``chunk_size`` for the gather."""

    def __init__(
        self,
        module: DiffusionModule,
        spec: DrawSpec,
        sampler: Sampler | None,
        extractor: nn.Module | None = None,
        guide: DiffusionModule | None = None,
        guide_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.module, self.spec, self.sampler = module, spec, sampler
        self.extractor = extractor
        self.guide, self.guide_weight = guide, float(guide_weight)  # a submodule: moved too

    def predict_step(self, chunk: int) -> dict[str, Tensor]:
        spec, module = self.spec, self.module
        channels, height, width = module.image_shape
        images = torch.zeros(spec.chunk_size, height, width, channels, dtype=torch.uint8)
        labels = torch.full((spec.chunk_size,), -1, dtype=torch.long)
        dim = getattr(self.extractor, "num_features", 0)
        features = torch.zeros(spec.chunk_size, dim)
        count = 0
        if chunk >= 0:
            indices = chunk_range(chunk, spec.chunk_size, spec.total)
            count = len(indices)
            chosen = module.labels_for(indices, spec.class_label, spec.guidance)
            drawn = module.sample(
                indices,
                seed=spec.seed,
                batch_size=spec.batch_size,
                sampler=self.sampler,
                progress=self.trainer.is_global_zero,  # the sampler's steps, rank 0 only
                labels=chosen,
                guidance_scale=spec.guidance,
                guide=self.guide,
                guide_weight=self.guide_weight,
            )  # [n, C, H, W] in [-1, 1]
            images[:count] = torch.from_numpy(to_uint8(drawn))  # [n, H, W, C]
            if chosen is not None:
                labels[:count] = torch.tensor(chosen)
            if self.extractor is not None:
                batch = spec.batch_size or count
                features[:count] = extract_features(self.extractor, drawn, batch, self.device)
        return {
            "chunk": torch.tensor([chunk, count], device=self.device),
            "images": images.to(self.device),
            "labels": labels.to(self.device),
            "features": features.to(self.device),
        }


class ChunkWriter(L.Callback):
    """Gathers every step's chunks from all ranks; rank 0 writes each one (PNGs first,
    then the chunk file, so a chunk file on disk means a finished chunk)."""

    def __init__(self, spec: DrawSpec, conditional: bool, with_features: bool) -> None:
        self.spec, self.conditional, self.with_features = spec, conditional, with_features
        self.written = 0
        self._start = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, Tensor],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with warnings.catch_warnings():  # Lightning's all_gather calls a deprecated torch op
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
            gathered = {k: pl_module.all_gather(v) for k, v in outputs.items()}
        if trainer.world_size == 1:  # all_gather adds the rank dimension only under DDP
            gathered = {k: v.unsqueeze(0) for k, v in gathered.items()}
        if not trainer.is_global_zero:
            return
        for rank in range(gathered["chunk"].shape[0]):  # [world, ...]
            chunk, count = (int(v) for v in gathered["chunk"][rank])
            if chunk < 0:
                continue
            self._write(chunk, count, {k: v[rank][:count].cpu() for k, v in gathered.items()})
        self._report(trainer)

    def _report(self, trainer: L.Trainer) -> None:
        """One line per step: samples written, rate and time left."""
        plan = trainer.datamodule
        done = plan.resumed + self.written
        seconds = time.perf_counter() - self._start
        rate = self.written / max(seconds, 1e-9)
        left = (self.spec.total - done) / rate if rate > 0 else float("nan")
        print(
            f"drawn {done}/{self.spec.total} samples ({rate:.1f}/s on {trainer.world_size} "
            f"process{'es' if trainer.world_size > 1 else ''}, {left:.0f} s left)",
            flush=True,
        )

    def _write(self, chunk: int, count: int, data: dict[str, Tensor]) -> None:
        spec = self.spec
        indices = np.arange(chunk * spec.chunk_size, chunk * spec.chunk_size + count)
        images = data["images"].numpy()  # [n, H, W, C] uint8
        if spec.save_png:
            for index, image in zip(indices, images, strict=True):
                save_png(image, spec.out / "samples" / png_name(int(index), spec.total))
        arrays = {"images": images, "indices": indices}
        if self.conditional:
            arrays["labels"] = data["labels"].numpy()
        if self.with_features:
            arrays["features"] = data["features"].float().numpy()
        save_chunk(spec.out, chunk, arrays)
        self.written += count
