"""Non-leaky augmentation (Karras et al. 2022, App. D.2): each transform does what its
labels say, nothing happens at p = 0, and the net takes the labels as conditioning."""

import pytest
import torch

from ddpm.data.augment import AUGMENT_DIM, AugmentPipe
from ddpm.nets.unet import UNet

ONLY = dict.fromkeys(("xflip", "yflip", "rotate_int", "translate_int", "scale"), 0.0)


def images(n: int = 64, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 2, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_probability_zero_changes_nothing_and_labels_are_zero():
    x = images()
    out, labels = AugmentPipe(p=0.0)(x)
    assert torch.equal(out, x) and torch.equal(labels, torch.zeros(64, AUGMENT_DIM))


@pytest.mark.parametrize(("key", "column", "op"), [("xflip", 0, 3), ("yflip", 1, 2)])
def test_flips_are_labelled(key, column, op):
    torch.manual_seed(1)
    x = images()
    out, labels = AugmentPipe(p=1.0, **{**ONLY, key: 1.0})(x)
    flipped = labels[:, column] == 1
    assert 0.3 < flipped.float().mean() < 0.7  # a fair coin for every chosen image
    assert torch.equal(out[flipped], x[flipped].flip(op))
    assert torch.equal(out[~flipped], x[~flipped])
    assert (labels[:, [c for c in range(AUGMENT_DIM) if c != column]] == 0).all()


def test_quarter_turns_are_rotations_labelled_by_their_flips():
    torch.manual_seed(2)
    x = images()
    out, labels = AugmentPipe(p=1.0, **{**ONLY, "rotate_int": 1.0})(x)
    k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    turns = [k[(int(a), int(b))] for a, b in labels[:, 2:4].tolist()]
    assert set(turns) == {0, 1, 2, 3}
    for i, quarter in enumerate(turns):  # k quarter turns, one fixed sense of rotation
        assert torch.equal(out[i], torch.rot90(x[i], k=quarter, dims=(1, 2)))


def test_integer_translation_shifts_with_mirrored_borders():
    torch.manual_seed(3)
    x = images(n=32, size=16)
    pipe = AugmentPipe(p=1.0, **{**ONLY, "translate_int": 1.0}, translate_int_max=0.125)
    out, labels = pipe(x)
    shifts = (labels[:, 4:6] * 16 * 0.125).round().long()  # labels = shift / 2 pixels
    assert shifts.abs().max() <= 2 and (shifts != 0).any()
    for i, (tx, ty) in enumerate(shifts.tolist()):
        # output pixel (y, x) comes from (y - ty, x - tx), reflected at the border
        cols = [abs(c - tx) if c - tx < 0 else min(c - tx, 30 - (c - tx)) for c in range(16)]
        rows = [abs(r - ty) if r - ty < 0 else min(r - ty, 30 - (r - ty)) for r in range(16)]
        assert torch.equal(out[i], x[i][:, rows][:, :, cols])


def test_zoom_is_labelled_and_untouched_images_stay_exact():
    torch.manual_seed(4)
    x = images()
    out, labels = AugmentPipe(p=0.5, **{**ONLY, "scale": 1.0})(x)
    zoomed = labels[:, 6] != 0
    assert 0.3 < zoomed.float().mean() < 0.7
    assert torch.equal(out[~zoomed], x[~zoomed])
    assert not torch.allclose(out[zoomed], x[zoomed])
    # a flat image stays flat whatever the zoom (bilinear, mirrored borders)
    flat = torch.full((4, 1, 8, 8), 0.25)
    assert torch.allclose(AugmentPipe(p=1.0, **{**ONLY, "scale": 1.0})(flat)[0], flat, atol=1e-6)


def test_the_same_seed_augments_the_same_way():
    x = images()
    torch.manual_seed(5)
    a = AugmentPipe(p=0.5)(x)
    torch.manual_seed(5)
    b = AugmentPipe(p=0.5)(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_net_takes_the_labels_and_zero_labels_are_no_augmentation():
    small = {"image_size": 8, "in_channels": 1, "base_channels": 8, "channel_mults": (1,)}
    small |= {"attention_resolutions": (), "dropout": 0.0}
    net = UNet(**small, augment_dim=7)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 2.0, 3.0])
    labels = torch.randn(3, 7)
    assert not torch.allclose(net(x, t, aug=labels), net(x, t))
    assert torch.allclose(net(x, t, aug=torch.zeros(3, 7)), net(x, t))
    plain = UNet(**small)
    with pytest.raises(ValueError, match=r"takes no augmentation labels"):
        plain(x, t, aug=labels)


def test_bad_augment_values_are_refused():
    with pytest.raises(ValueError, match=r"augment\.p=1\.5 must lie in \[0, 1\]"):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match=r"augment\.scale=-1 must be >= 0"):
        AugmentPipe(scale=-1)
    with pytest.raises(ValueError, match=r"augment\.rotate_int needs square images"):
        AugmentPipe(p=1.0)(torch.zeros(2, 1, 4, 6))
