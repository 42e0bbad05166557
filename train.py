"""Train a diffusion model: `python train.py [hydra overrides]` (see conf/train.yaml)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ddpm.runs import cli
from ddpm.runs.errors import run_hydra_main

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def _main(cfg: DictConfig) -> float | None:
    return cli.train(cfg)


def main() -> None:
    """``python train.py`` and ``ddpm-train``."""
    run_hydra_main(_main, CONF, "train")


if __name__ == "__main__":
    main()
