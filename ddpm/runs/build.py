"""Building a run's objects from its config: the module, the callbacks, a checkpoint.

One direction: config -> objects. Every object comes from a ``_target_`` node; the typed
constructors validate their arguments and raise ValueError naming the key.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, WeightAveraging
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.runs.checkpoints import read_checkpoint, state_dict_mismatch
from ddpm.runs.errors import UsageError
from ddpm.training.guards import TrainerGuard
from ddpm.training.module import DiffusionModule


def auto_precision() -> str:
    """``precision=auto``: 16-mixed on a CUDA GPU, full float32 elsewhere."""
    return "16-mixed" if torch.cuda.is_available() else "32-true"


OmegaConf.register_new_resolver("ddpm.auto_precision", auto_precision, replace=True)
OmegaConf.register_new_resolver("ddpm.cuda", torch.cuda.is_available, replace=True)


def steps_per_part(max_steps: int, parts: int) -> int:
    """``ceil(max_steps / parts)`` steps (power EMA's ``snapshot_every``: ``parts``
    snapshots per run); 1,000 when the run has no step limit (``max_steps=-1``)."""
    return max(1, -(-int(max_steps) // int(parts))) if int(max_steps) > 0 else 1000


OmegaConf.register_new_resolver("ddpm.steps_per_part", steps_per_part, replace=True)

# EDM's values that depend on the data: natural images get Karras et al.'s (sigma_data 0.5,
# the std of CIFAR-10 in [-1, 1]; P_mean -1.2; 18 Heun steps), the 8x8 digits their tuned
# ones (std 0.75; training centred on larger sigmas, where 8x8 digits have detail; 10
# steps; docs/edm.md).
EDM_DATA_DEFAULTS = {
    "natural": {"sigma_data": 0.5, "p_mean": -1.2, "steps": 18},
    "digits": {"sigma_data": 0.75, "p_mean": -0.4, "steps": 10},
}


def edm_default(key: str, data_name: str) -> float | int:
    """``${ddpm.edm_default:KEY,${data.name}}``: EDM's KEY for this data."""
    return EDM_DATA_DEFAULTS.get(data_name, EDM_DATA_DEFAULTS["natural"])[key]


OmegaConf.register_new_resolver("ddpm.edm_default", edm_default, replace=True)
# Lightning 2.6 on torch >= 2.10 warns about a torch-internal pytree API at every fit: noise.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# The training batches' order is derived from the step (ddpm.data.batches), so mid-epoch
# resumes are exact although the loader keeps no state Lightning could save.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
# DiffusionModule.on_before_batch_transfer only reseeds; the data module's on_after_batch_
# transfer (which it does not override) still runs.
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer`.*")


def build_module(cfg: DictConfig) -> DiffusionModule:
    """Instantiate net, schedule, objective, sampler, augmentation and the module from a
    run config. With augmentation on, the net's ``augment_dim`` is set from the pipe (and
    recorded in ``cfg``, which the checkpoint stores)."""
    image_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    lr_scheduler = cfg.get("lr_scheduler")
    augment = instantiate(cfg.augment) if cfg.get("augment") is not None else None
    if augment is not None:
        with open_dict(cfg):
            cfg.model.augment_dim = augment.dim
    return DiffusionModule(
        net=instantiate(cfg.model),
        schedule=instantiate(cfg.schedule),
        objective=instantiate(cfg.objective),
        sampler=instantiate(cfg.sampler),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(lr_scheduler) if lr_scheduler is not None else None,
        image_shape=image_shape,
        val_seed=cfg.get("val_seed", 0),
        config=OmegaConf.to_container(cfg, resolve=True),
        train_seed=cfg.get("seed") or 0,
        compile=bool(cfg.get("compile", False)),
        channels_last=bool(cfg.get("channels_last", False)),
        compile_backend=str(cfg.get("compile_backend", "inductor")),
        augment=augment,
    )


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[L.Callback]:
    """Instantiate ``cfg.callbacks``, the ``cfg.eval`` (FID/KID) callback and the
    ``cfg.trainer_guard`` (signals, non-finite losses).

    Weight averaging goes after the others, so that the other validation-time callbacks
    run while the averaged (EMA) weights are swapped in; the guard goes last. Without a
    logger, LearningRateMonitor (which needs one) is left out; with
    ``trainer.enable_progress_bar=false``, the progress bar.
    """
    nodes = list((cfg.get("callbacks") or {}).values())
    for extra in ("eval", "trainer_guard"):
        if cfg.get(extra) is not None:
            nodes.append(cfg[extra])
    callbacks = [
        instantiate(node) for node in nodes if isinstance(node, DictConfig) and "_target_" in node
    ]
    if not has_logger:
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if (cfg.get("trainer") or {}).get("enable_progress_bar", True) is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    return sorted(callbacks, key=_callback_order)


def _callback_order(callback: L.Callback) -> int:
    """Weight averaging after the others (they see the EMA weights in validation); the
    guard after it (a checkpoint it writes at a step's end includes that step's EMA)."""
    return 2 if isinstance(callback, TrainerGuard) else int(isinstance(callback, WeightAveraging))


def _strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``_orig_mod.`` segments that ``torch.compile`` adds to parameter names."""
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild a DiffusionModule from a checkpoint file alone (its stored config plus its
    weights; ``state_dict`` holds the EMA weights when EMA was on). The file is read with
    ``weights_only=True``; a file that does not fit gets a one-line UsageError."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, map_location)  # CheckpointError (a ValueError) says why not
    module = build_module(OmegaConf.create(ckpt["hyper_parameters"]["config"]))
    load_weights(module, _strip_compile_prefix(ckpt["state_dict"]), path)
    return module.eval()


def load_weights(module: torch.nn.Module, state_dict: dict[str, Any], path: Path) -> None:
    """``load_state_dict`` that names what does not fit instead of a traceback."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, network {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected:
        raise UsageError(state_dict_mismatch(path, missing, unexpected))
    if shapes:
        raise UsageError(
            f"the weights in {path} do not fit the network its stored config builds: "
            f"{len(shapes)} shape(s) differ (e.g. {shapes[0]})"
        )
    module.load_state_dict(state_dict)
