"""``python -m ddpm.evaluation.reference data=NAME split=SPLIT out=FILE.npz``: compose
conf/reference.yaml with Hydra (the data configs of training, with their overrides) and
write the real-data statistics of that split as a portable ``.npz``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

import ddpm.runs.build  # noqa: F401 - registers the ${ddpm.*} resolvers the data configs use
from ddpm.evaluation.extractors import build_feature_extractor
from ddpm.evaluation.reference import extractor_meta, streamed_stats
from ddpm.runs.errors import UsageError, fail, user_error
from ddpm.runs.prepare import check_writable

CONF = Path(__file__).resolve().parents[2] / "conf"


def write_reference(cfg: DictConfig) -> Path:
    """Compute the statistics ``cfg`` names and write them to ``cfg.out``."""
    if not cfg.get("out"):
        raise UsageError(
            "out is required: python -m ddpm.evaluation.reference data=cifar10 split=train "
            "out=cifar10_train.npz"
        )
    out = Path(cfg.out)
    if out.suffix != ".npz":
        raise UsageError(f"out={out} must end in .npz (the file numpy and pytorch-fid read)")
    check_writable(out.parent)
    datamodule = instantiate(cfg.data)
    name = cfg.get("feature_extractor") or datamodule.feature_extractor
    extractor = build_feature_extractor(name)
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = {**extractor_meta(name, extractor), "data": datamodule.name, "split": cfg.split}
    batches = datamodule.split_batches(cfg.split)  # uint8, never the whole split at once
    stats = streamed_stats(batches, datamodule.split_size(cfg.split), extractor, device, meta)
    stats.save(out, kid_features=bool(cfg.kid_features))
    print(
        f"wrote {out}: {stats.dim}-d {name} statistics of {stats.num_images} {datamodule.name} "
        f"{cfg.split} images (weights {meta['extractor_hash']}; resize: {meta['resize']})"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="reference", overrides=overrides)
        write_reference(cfg)
    except HydraException as exc:
        fail(str(exc).strip().splitlines()[0])
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        fail(message)


if __name__ == "__main__":
    main()
