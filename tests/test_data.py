import pytest
import torch

from ddpm.data import ImageDataModule


def test_digits_are_scaled_split_and_deterministic():
    dm = ImageDataModule(name="digits", batch_size=32, val_fraction=0.1, split_seed=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 180
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.long
    assert x.min() >= -1.0 and x.max() <= 1.0
    images = dm.train_set.tensors[0]
    assert images.min().item() == -1.0 and images.max().item() == 1.0

    again = ImageDataModule(name="digits", val_fraction=0.1, split_seed=0)
    again.setup("fit")
    assert torch.equal(again.val_set.images, dm.val_set.images)
    other = ImageDataModule(name="digits", val_fraction=0.1, split_seed=1)
    other.setup("fit")
    assert not torch.equal(other.val_set.images, dm.val_set.images)


def test_validation_batches_carry_dataset_indices():
    dm = ImageDataModule(name="digits", batch_size=50, val_fraction=0.1)
    dm.setup("fit")
    indices = torch.cat([batch[2] for batch in dm.val_dataloader()])
    assert torch.equal(indices, torch.arange(180))


def test_image_size_resizes():
    dm = ImageDataModule(name="digits", image_size=16, batch_size=8)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, "data.name='imagenet' is unknown"),
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"val_fraction": 1.0}, "data.val_fraction=1.0"),
        ({"image_size": 0}, "data.image_size=0"),
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
