"""Draw images from a checkpoint: `python sample.py ckpt_path=CKPT out_dir=OUT num_samples=N`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ddpm.runs import cli
from ddpm.runs.errors import run_hydra_main

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="sample")
def _main(cfg: DictConfig) -> None:
    cli.sample(cfg)


def main() -> None:
    """``python sample.py`` and ``ddpm-sample``."""
    run_hydra_main(_main, CONF, "sample")


if __name__ == "__main__":
    main()
