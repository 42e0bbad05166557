import pytest
import torch

from ddpm.data.datamodule import ImageDataModule


def test_digits_are_scaled_split_and_deterministic():
    dm = ImageDataModule(name="digits", batch_size=32, val_fraction=0.1, split_seed=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 180
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.long
    assert index.shape == (32,)
    images = dm.split_images("train")
    assert images.min().item() == -1.0 and images.max().item() == 1.0

    again = ImageDataModule(name="digits", val_fraction=0.1, split_seed=0)
    assert torch.equal(again.split_images("val"), dm.split_images("val"))
    other = ImageDataModule(name="digits", val_fraction=0.1, split_seed=1)
    assert not torch.equal(other.split_images("val"), dm.split_images("val"))
    assert dm.split_images("all").shape[0] == 1797


def test_val_fraction_zero_trains_on_every_image_and_validates_on_a_fixed_subset():
    dm = ImageDataModule(name="digits", val_fraction=0, val_size=300, split_seed=0)
    dm.setup("fit")
    everything = ImageDataModule(name="digits", val_fraction=0.5)
    everything.setup("fit")
    all_images = torch.cat([everything.train_set.images, everything.val_set.images])
    assert dm.train_set.images.shape[0] == all_images.shape[0] == 1797
    assert dm.val_set.images.shape[0] == 300
    train_rows = {tuple(x.flatten().tolist()) for x in dm.train_set.images}
    assert all(tuple(x.flatten().tolist()) in train_rows for x in dm.val_set.images)
    again = ImageDataModule(name="digits", val_fraction=0, val_size=300, split_seed=0)
    again.setup("fit")
    assert torch.equal(again.val_set.images, dm.val_set.images)  # fixed
    assert dm.split_images("all").shape[0] == 1797  # no image counted twice
    default = ImageDataModule(name="digits", val_fraction=0)
    default.setup("fit")
    assert default.val_set.images.shape[0] == 1000


def test_validation_batches_carry_dataset_indices():
    dm = ImageDataModule(name="digits", batch_size=50, val_fraction=0.1)
    dm.setup("fit")
    indices = torch.cat([batch[2] for batch in dm.val_dataloader()])
    assert torch.equal(indices, torch.arange(180))


def test_image_size_resizes():
    dm = ImageDataModule(name="digits", image_size=16, batch_size=8)
    dm.setup("fit")
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.uint8


def test_device_resident_batches_equal_loader_batches():
    """Indices looked up on the device give the same batches as the host loader."""
    host = ImageDataModule(name="digits", batch_size=40)
    resident = ImageDataModule(name="digits", batch_size=40, device_resident=True)
    host.setup("fit")
    resident.setup("fit")
    for a, b in zip(host.val_dataloader(), resident.val_dataloader(), strict=True):
        x_a, y_a, i_a = host.on_after_batch_transfer(a, 0)
        x_b, y_b, i_b = resident.on_after_batch_transfer(b, 0)
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b) and torch.equal(i_a, i_b)
    assert b.dtype == torch.long and b.ndim == 1  # the loader moved indices only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, "data.name='imagenet' is unknown"),
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"val_fraction": 1.0}, "data.val_fraction=1.0 must lie in [0, 1)"),
        ({"val_size": 100}, "data.val_size=100 is for data.val_fraction=0"),
        ({"val_fraction": 0, "val_size": 0}, "must be a positive integer"),
        ({"image_size": 0}, "data.image_size=0"),
        ({"channels": 2}, "data.channels=2 must be 1 (grey) or 3 (RGB)"),
        ({"in_memory": False, "device_resident": True}, "needs data.in_memory=true"),
    ],
)
def test_bad_data_config_is_refused(kwargs, message):
    with pytest.raises(ValueError) as err:
        ImageDataModule(**kwargs)
    assert message in str(err.value)


def test_channel_mismatch_is_refused_at_setup():
    dm = ImageDataModule(name="digits", channels=3)
    with pytest.raises(ValueError, match=r"set data\.channels=1"):
        dm.setup("fit")
