"""The held-out yardstick: precision/recall, memorisation, the held-out feature nets,
data=mnist5k, and the equal-n report with its floor."""

import math

import pytest
import torch

from ddpm.data.datamodule import ImageDataModule
from ddpm.data.mnist5k import EXTRACTOR_PER_CLASS, extractor_part, read_mnist5k
from ddpm.evaluation.heldout import heldout_report
from ddpm.evaluation.heldout_features import digits_framing
from ddpm.evaluation.manifold import (
    knn_radii,
    memorisation_rate,
    pixel_vectors,
    precision_recall,
)


def test_knn_radii_skip_the_point_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="more than k=5 images"):
        knn_radii(points, k=5)


def test_precision_and_recall_tell_off_manifold_samples_from_missing_modes():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(500, 2, generator=g) + 10, torch.randn(500, 2, generator=g)])
    same = torch.cat([torch.randn(500, 2, generator=g) + 10, torch.randn(500, 2, generator=g)])
    precision, recall = precision_recall(real, same)
    assert precision > 0.9 and recall > 0.9
    one_mode = torch.randn(1000, 2, generator=g) + 10  # half the data never drawn
    precision, recall = precision_recall(real, one_mode)
    assert precision > 0.9 and 0.4 < recall < 0.6
    off = torch.randn(1000, 2, generator=g) + 5  # between the modes: off the manifold
    precision, recall = precision_recall(real, off)
    assert precision < 0.1 and recall < 0.1


def test_memorisation_is_one_for_copies_and_about_the_quantile_for_new_images():
    g = torch.Generator().manual_seed(0)
    train, heldout, new = (torch.randn(n, 16, generator=g) for n in (2000, 2000, 2000))
    rate, threshold = memorisation_rate(train[:500] + 1e-3, train, heldout)
    assert rate == 1.0 and threshold > 0.1
    rate, _ = memorisation_rate(new, train, heldout)
    assert 0.03 < rate < 0.07  # the 5% quantile of images the model never saw
    with pytest.raises(ValueError, match="held-out real images"):
        memorisation_rate(new, train, heldout[:0])


def test_pixel_vectors_area_resize_large_images_only():
    small = torch.rand(2, 3, 8, 8)
    assert torch.equal(pixel_vectors(small), small.flatten(1))
    big = torch.ones(2, 3, 256, 128)
    assert pixel_vectors(big).shape == (2, 3 * 32 * 16)


def test_digits_framing_cuts_the_square_around_the_strokes():
    image = -torch.ones(1, 1, 28, 28)
    image[0, 0, 10:18, 12:14] = 1.0  # a bar 8 tall, 2 wide, off-centre
    framed = digits_framing(image)  # [1, 1, 8, 8]
    assert framed.shape == (1, 1, 8, 8)
    assert framed[0, 0, :, 3:5].min() > 0.9 and framed[0, 0, :, 0].max() == -1.0


def test_mnist5k_is_the_4000_digits_the_feature_net_never_saw():
    images, labels = read_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    part = extractor_part(labels)
    assert int(part.sum()) == 10 * EXTRACTOR_PER_CLASS
    assert torch.bincount(labels[part]).tolist() == [EXTRACTOR_PER_CLASS] * 10
    data = ImageDataModule(name="mnist5k", image_size=28, val_fraction=0.5)
    train, val = data.split_images("train"), data.split_images("val")
    assert train.shape == (2000, 1, 28, 28) and val.shape == (2000, 1, 28, 28)
    kept = (images[~part].float() / 127.5 - 1).flatten(1)
    held = (images[part].float() / 127.5 - 1).flatten(1)
    seen = torch.cat([train, val]).flatten(1)
    assert torch.cdist(seen[:300], held).min() > 1  # no extractor image in the data set
    assert torch.cdist(seen[:300], kept).min(1).values.max() < 0.1  # all from the rest


def test_equal_n_report_scores_real_images_at_the_floor_and_copies_as_copies():
    from ddpm.evaluation.extractors import build_feature_extractor

    data = ImageDataModule(name="digits", val_fraction=0.5)
    extractor = build_feature_extractor("digits_heldout")
    train = data.split_images("train")
    real = heldout_report(train, data, extractor, "val")  # the training images themselves
    assert real["n"] == 898 and real["floor"]["images"] == "the train split"
    for key in ("fid", "precision", "recall"):  # the floor is exactly this case
        assert real[key] == pytest.approx(real["floor"][key])
    assert real["memorisation"] == 1.0 and real["floor"]["memorisation"] == 0.05
    fresh = heldout_report(data.split_images("val").flip(0), data, extractor, "train")
    assert fresh["floor"]["images"] == "the val split"
    assert fresh["memorisation"] == pytest.approx(0.05, abs=0.02)  # held-out reals
    noise = heldout_report(torch.rand(898, 1, 8, 8) * 2 - 1, data, extractor, "val")
    assert noise["fid"] > 5 * real["fid"] and noise["precision"] < 0.2


def test_no_held_out_split_gives_no_floor_and_says_why():
    from ddpm.evaluation.extractors import build_feature_extractor

    data = ImageDataModule(name="digits", val_fraction=0.0)
    report = heldout_report(
        data.split_images("train")[:50], data, build_feature_extractor("digits")
    )
    assert report["n"] == 50 and report["floor"] is None and report["memorisation"] is None
    assert "val_fraction=0" in report["why"]


def test_a_reference_of_every_image_has_no_floor():
    from ddpm.evaluation.extractors import build_feature_extractor

    data = ImageDataModule(name="digits", val_fraction=0.5)
    images = data.split_images("val")[:40]
    report = heldout_report(images, data, build_feature_extractor("digits"), "all")
    assert report["n"] == 40 and report["floor"] is None and "all" in report["why"]
    assert 0 <= report["memorisation"] <= 1  # against the train split, as for any reference


def test_a_draw_of_k_images_or_fewer_has_no_precision_or_recall():
    from ddpm.evaluation.extractors import build_feature_extractor

    data = ImageDataModule(name="digits", val_fraction=0.5)
    report = heldout_report(data.split_images("val")[:4], data, build_feature_extractor("digits"))
    assert report["n"] == 4 and report["precision"] is None and report["recall"] is None
    assert math.isfinite(report["fid"]) and report["floor"]["precision"] is None
