"""The digits FID floor: held-out real digits against the training reference, next to
generated samples at the same count (FID is biased upwards for small samples, so only
equal counts compare).

    python sample.py ckpt_path=CKPT out_dir=OUT num_samples=1000 evaluate=true
    python benchmarks/fid_floor.py OUT/samples.npz
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ddpm.data.datamodule import ImageDataModule
from ddpm.evaluation.features import extract_features, load_digits_feature_net
from ddpm.evaluation.metrics import fid_kid
from ddpm.evaluation.reference import ReferenceStats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="samples.npz written by sample.py (uint8 N x H x W x C)")
    args = parser.parse_args()

    data = ImageDataModule(name="digits")
    net = load_digits_feature_net()
    reference = ReferenceStats.from_features(extract_features(net, data.split_images("train")))
    held_out = extract_features(net, data.split_images("val"))
    pixels = torch.from_numpy(np.load(args.samples)["images"])
    generated = extract_features(
        net, pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    )  # NHWC -> NCHW

    n = held_out.shape[0]
    rows = {
        f"held-out real, N={n}": fid_kid(reference, held_out, kid_subset_size=n),
        f"generated, N={n}": fid_kid(reference, generated[:n], kid_subset_size=n),
        f"generated, N={generated.shape[0]}": fid_kid(reference, generated),
    }
    print(f"digits features; reference: {reference.num_images} train images")
    for name, m in rows.items():
        print(f"{name:24s} FID {m['fid']:8.2f}   KID {m['kid_mean']:9.1f} +- {m['kid_std']:.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
