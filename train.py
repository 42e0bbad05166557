"""Train a diffusion model: `python train.py [hydra overrides]` (see conf/train.yaml)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ddpm.runs import cli


@hydra.main(
    version_base="1.3",
    config_path=str(Path(__file__).resolve().parent / "conf"),
    config_name="train",
)
def main(cfg: DictConfig) -> float | None:
    return cli.train(cfg)


if __name__ == "__main__":
    main()
