import re
import urllib.error

import numpy as np
import pytest
import torch

from ddpm.data.datamodule import ImageDataModule
from ddpm.evaluation import features
from ddpm.evaluation.features import DigitsFeatureNet, InceptionFeatures, load_digits_feature_net
from ddpm.evaluation.metrics import evaluate_images, fid_kid
from ddpm.evaluation.reference import ReferenceStats, data_reference, reference_stats
from tests.fabricate import write_folder


@pytest.fixture(scope="module")
def digits():
    data = ImageDataModule(name="digits", val_fraction=0.1, split_seed=0)
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def net():
    return load_digits_feature_net()


def test_digits_feature_net_classifies_held_out_digits(digits, net):
    with torch.no_grad():
        predicted = net.logits(digits.split_images("val")).argmax(1)
    assert (predicted == digits.split_labels("val")).float().mean() >= 0.95
    assert net(digits.split_images("val")[:3]).shape == (3, DigitsFeatureNet.num_features)


def test_digits_feature_net_is_cached_and_deterministic(net):
    again = load_digits_feature_net()
    for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fid_of_data_against_itself_is_zero_and_of_noise_is_large(digits, net):
    with torch.no_grad():
        real = net(digits.split_images("train"))
        noise = net(torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    reference = ReferenceStats.from_features(real)
    assert abs(fid_kid(reference, real)["fid"]) < 1e-3
    # two disjoint halves of the real images: KID (unbiased) is zero within its spread
    half = real.shape[0] // 2
    halves = fid_kid(ReferenceStats.from_features(real[:half]), real[half:], kid_subset_size=500)
    assert abs(halves["kid_mean"]) < 3 * halves["kid_std"]
    far = fid_kid(reference, noise)
    assert far["fid"] > 100 and far["kid_mean"] > 10 * far["kid_std"]
    assert fid_kid(reference, noise) == far  # KID subsets come from a fixed seed


def test_reference_statistics_are_cached(net):
    calls = []

    def images():
        calls.append(1)
        return torch.rand(50, 1, 8, 8) * 2 - 1

    first, computed = reference_stats("test-cache-key", images, net)
    second, computed_again = reference_stats("test-cache-key", images, net)
    assert (computed, computed_again) == (True, False)
    assert len(calls) == 1
    assert np.array_equal(first.sigma, second.sigma) and np.array_equal(first.mu, second.mu)
    assert second.num_images == 50


def test_evaluate_images_reports_what_it_measured_against(digits):
    report = evaluate_images(digits.split_images("val"), digits, split="train")
    assert report["feature_extractor"] == "digits" and report["num_samples"] == 180
    assert report["reference"]["num_images"] == 1617
    assert re.fullmatch(r"digits-train-digits-v2-[0-9a-f]{16}-v4", report["reference"]["key"])
    # 180 held-out digits against the training digits: the real-data floor at N=180
    # (benchmarks/fid_floor.py, docs/evaluation.md: 49.64), dominated by FID's small-N bias
    assert report["fid"] == pytest.approx(49.64, rel=0.02)
    itself = evaluate_images(digits.split_images("train"), digits, split="train")
    assert abs(itself["fid"]) < 1e-6


def _covariance(f: torch.Tensor) -> torch.Tensor:
    centred = f.double() - f.double().mean(0)
    return centred.T @ centred / (f.shape[0] - 1)


def test_fid_matches_closed_forms():
    """FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017,
    Eq. 6). For b = c a + m, S_b = c^2 S_a and (S_a S_b)^(1/2) = c S_a, so
    FID = |mu_a - mu_b|^2 + (1 - c)^2 tr(S_a) exactly; for independent Gaussian sets with
    diagonal covariances, the square root is elementwise."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 16, generator=g).double() @ torch.randn(16, 16, generator=g).double()
    c, m = 0.6, torch.linspace(-1, 1, 16, dtype=torch.float64)
    b = c * a + m
    expected = (a.mean(0) - b.mean(0)).square().sum() + (1 - c) ** 2 * _covariance(a).trace()
    measured = fid_kid(ReferenceStats.from_features(a), b, kid_subsets=2)["fid"]
    assert measured == pytest.approx(float(expected), rel=1e-4)

    # two Gaussian sets, N(0, diag(s_a^2)) and N(mu, diag(s_b^2)), in their population form
    s_a, s_b = torch.linspace(0.5, 2.0, 8), torch.linspace(2.0, 0.5, 8)
    mu = torch.full((8,), 0.5)
    x = torch.randn(200_000, 8, generator=g) * s_a
    y = torch.randn(200_000, 8, generator=g) * s_b + mu
    population = float(mu.square().sum() + (s_a - s_b).square().sum())  # = 2 + 2.7857
    measured = fid_kid(ReferenceStats.from_features(x), y, kid_subsets=2)["fid"]
    assert measured == pytest.approx(population, abs=0.05)


def test_different_folders_at_one_size_get_their_own_statistics(tmp_path, net):
    """Two image folders, same size and channels: each is scored against itself, not the
    first one cached (the cache key has the root and a content fingerprint)."""
    folders = {}
    for name, seed in (("a", 1), ("b", 2)):
        write_folder(tmp_path / name, per_class=40, corrupt=False, seed=seed)
        folders[name] = ImageDataModule(
            name="folder", root=str(tmp_path / name), image_size=8, channels=1
        )
    images = folders["a"].split_images("train")
    on_a = evaluate_images(images, folders["a"], split="train")
    on_b = evaluate_images(images, folders["b"], split="train")
    assert on_a["reference"]["key"] != on_b["reference"]["key"]
    assert abs(on_a["fid"]) < 1e-6 and on_b["fid"] > 0.1
    # grey and RGB decodings of the same folder are different data too
    rgb = ImageDataModule(name="folder", root=str(tmp_path / "a"), image_size=8, channels=3)
    assert rgb.split_fingerprint("train") != folders["a"].split_fingerprint("train")


def test_a_new_feature_net_version_recomputes_the_statistics(monkeypatch, digits, net):
    calls = []
    real_split_batches = digits.split_batches
    monkeypatch.setattr(digits, "split_batches", lambda s: calls.append(s) or real_split_batches(s))
    key, first = data_reference(digits, "val", "digits", net)  # computed or cached
    calls.clear()
    assert data_reference(digits, "val", "digits", net)[0] == key
    assert calls == []  # a cache hit reads no images
    monkeypatch.setattr(features, "DIGITS_VERSION", 99)
    new_key, again = data_reference(digits, "val", "digits", net)
    assert "-digits-v99-" in new_key and new_key.replace("v99", "v2") == key
    assert calls == ["val"]  # computed anew
    assert np.array_equal(again.sigma, first.sigma)  # (same net object here)


def test_inception_offline_says_what_to_fetch_and_where(monkeypatch, tmp_path):
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "checkpoints") in message
    assert "eval=null" in message and "eval.feature_extractor=digits" in message


def test_unknown_feature_extractor_is_refused():
    from ddpm.evaluation.extractors import build_feature_extractor

    with pytest.raises(ValueError, match=r"eval\.feature_extractor='clip' is unknown"):
        build_feature_extractor("clip")
