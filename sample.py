"""Draw images from a checkpoint: `python sample.py ckpt_path=CKPT out_dir=OUT num_samples=N`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ddpm.runs import cli


@hydra.main(
    version_base="1.3",
    config_path=str(Path(__file__).resolve().parent / "conf"),
    config_name="sample",
)
def main(cfg: DictConfig) -> None:
    cli.sample(cfg)


if __name__ == "__main__":
    main()
