"""The EMA callback: buffers, and the raw weights in every checkpoint."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddpm.training.ema import EMA


class BatchNormRegressor(L.LightningModule):
    """A net with float buffers (running mean/var) and an integer one (num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks, steps: int = 5) -> tuple[L.Trainer, BatchNormRegressor]:
    torch.manual_seed(0)
    module = BatchNormRegressor()
    data = TensorDataset(torch.randn(64, 4) + 2.0, torch.randn(64, 1))
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer, module


def test_ema_with_buffers_averages_float_buffers_and_copies_integer_ones(tmp_path):
    """use_buffers=true on a BatchNorm net: lerp is not defined for num_batches_tracked
    (Long), so it is copied; running_mean/var are averaged like the weights."""
    decay = 0.5
    trainer, module = _fit(tmp_path, [EMA(decay=decay, use_buffers=True)], steps=5)
    average = trainer.callbacks[0]._average_model.module.net[1]
    bn = module.net[1]  # after fit the module holds the average (as in Lightning)
    assert int(average.num_batches_tracked) == 5
    # reference: the same 5 steps without EMA, recording running_mean after each step
    torch.manual_seed(0)
    means = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            means.append(pl_module.net[1].running_mean.clone())

    _fit(tmp_path / "ref", [Record()], steps=5)
    expected = means[0]
    for m in means[1:]:
        expected = decay * expected + (1 - decay) * m
    assert torch.allclose(average.running_mean, expected, atol=1e-6)
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert not torch.allclose(expected, means[-1])  # averaged, not followed


def test_a_checkpoint_written_after_fit_keeps_the_raw_weights(tmp_path):
    """After fit the module holds the average (Lightning's EMAWeightAveraging does that);
    a checkpoint written then still stores the raw weights as current_model_state."""
    trainer, _ = _fit(tmp_path, [EMA(decay=0.9, use_buffers=False)])
    _, raw_module = _fit(tmp_path / "raw", [])
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    raw = raw_module.state_dict()
    for name, value in ckpt["current_model_state"].items():
        assert torch.allclose(value, raw[name], atol=1e-6), name
    ema = trainer.callbacks[0]._average_model.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in ckpt["state_dict"].items())
    assert any(not torch.allclose(ckpt["state_dict"][k], raw[k]) for k in raw)
