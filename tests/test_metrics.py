import urllib.error

import pytest
import torch

from ddpm.data.datamodule import ImageDataModule
from ddpm.evaluation.features import DigitsFeatureNet, InceptionFeatures, load_digits_feature_net
from ddpm.evaluation.metrics import evaluate_images, fid_kid
from ddpm.evaluation.reference import ReferenceStats, reference_stats


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
    reference = ReferenceStats.from_features("train", real)
    assert abs(fid_kid(reference, real)["fid"]) < 1e-3
    # two disjoint halves of the real images: KID (unbiased) is zero within its spread
    half = real.shape[0] // 2
    halves = fid_kid(
        ReferenceStats.from_features("a", real[:half]), real[half:], kid_subset_size=500
    )
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
    assert torch.equal(first.feature_outer_sum, second.feature_outer_sum)
    assert second.num_samples == 50


def test_evaluate_images_reports_what_it_measured_against(digits):
    report = evaluate_images(digits.split_images("val"), digits, split="train")
    assert report["feature_extractor"] == "digits" and report["num_samples"] == 180
    assert report["reference"]["num_images"] == 1617
    assert report["reference"]["key"] == "digits-train-digits-8px-val0.1-seed0-v2"
    assert 0 < report["fid"] < 100


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


def test_unknown_feature_extractor_is_refused():
    from ddpm.evaluation.features import build_feature_extractor

    with pytest.raises(ValueError, match=r"eval\.feature_extractor='clip' is unknown"):
        build_feature_extractor("clip")
