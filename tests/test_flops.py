"""The training FLOP counter (callbacks/compute.ComputeMeter, on real Lightning steps) against a hand count for a
small conv net: forward, a gradient for every weight, a gradient for every layer's input except the first."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10, bias=False))


def _hand_forward(batch: int) -> tuple[int, int, int]:
    """Multiply-adds x 2 of each layer for a (batch, 3, 16, 16) input."""
    conv1 = 2 * batch * 8 * 16 * 16 * (3 * 3 * 3)    # 8 output maps of 16x16, 27 MACs each
    conv2 = 2 * batch * 16 * 8 * 8 * (8 * 3 * 3)     # stride 2: 8x8 outputs, 72 MACs each
    linear = 2 * batch * 10 * (16 * 8 * 8)
    return conv1, conv2, linear


class _LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_compute_meter_counts_real_training_steps(tmp_path):
    import json

    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.compute import ComputeMeter

    class OtherWork(L.Callback):
        """Work of another callback at the batch start (like a montage ERF refresh): not the step's."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x = torch.randn(64, 64, requires_grad=True)
            torch.autograd.grad((x @ x).sum(), x)

    data = TensorDataset(torch.randn(24, 3, 16, 16), torch.randint(0, 10, (24,)))
    meter = ComputeMeter(tmp_path / "compute.json", count=2, skip=1)
    trainer = L.Trainer(max_steps=5, accumulate_grad_batches=2, callbacks=[meter, OtherWork()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(_LitNet(), DataLoader(data, batch_size=4))
    written = json.loads((tmp_path / "compute.json").read_text())
    per_image = 3 * sum(_hand_forward(1)) - _hand_forward(1)[0]
    assert written["flops_per_step"] == 2 * 4 * per_image  # two micro-batches of 4 images per optimizer step
    assert written["counted_steps"] == 2 and written["optimizer_steps"] == 5
    assert written["total_flops"] == 5 * 2 * 4 * per_image
    assert written["images_seen"] == 5 * 2 * 4 and written["device"] == "cpu"


def test_compute_meter_times_the_uninstrumented_steps(tmp_path):
    """step_seconds: the median of the optimizer steps after the counted ones (the first step and the slower
    FLOP-counted steps excluded), each from its first micro-batch's start to its last one's end."""
    import json
    import time

    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.compute import ComputeMeter

    class Sleepy(_LitNet):
        def training_step(self, batch, batch_idx):
            time.sleep(0.05)
            return super().training_step(batch, batch_idx)

    data = TensorDataset(torch.randn(48, 3, 16, 16), torch.randint(0, 10, (48,)))
    meter = ComputeMeter(tmp_path / "compute.json", count=2, skip=1)
    trainer = L.Trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[meter], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(Sleepy(), DataLoader(data, batch_size=4))
    assert len(meter.step_seconds) == 3  # steps 3, 4, 5 (0: first; 1, 2: counted)
    written = json.loads((tmp_path / "compute.json").read_text())
    assert written["step_seconds"] >= 2 * 0.05  # two micro-batches of at least 0.05 s each
    assert written["step_seconds"] == pytest.approx(sorted(meter.step_seconds)[1], abs=1e-4)


def test_compute_meter_times_the_wait_for_data_and_each_validation(tmp_path):
    """data_seconds: the wait for the next batch between steps (here a dataset that sleeps 0.04 s per item, loaded
    in the main process); validation_seconds: one validation (sleeping 0.03 s per batch, sanity check excluded),
    with the batches it ran and those of the whole val loader."""
    import json
    import time

    from torch.utils.data import DataLoader, Dataset

    from callbacks.compute import ComputeMeter

    class SlowData(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            time.sleep(0.04)
            return torch.randn(3, 16, 16), i % 10

    class Validated(_LitNet):
        def validation_step(self, batch, batch_idx):
            time.sleep(0.03)

    meter = ComputeMeter(tmp_path / "compute.json", count=1, skip=1)
    trainer = L.Trainer(max_steps=8, val_check_interval=4, limit_val_batches=3, num_sanity_val_steps=2,
                        callbacks=[meter], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(Validated(), DataLoader(SlowData(), batch_size=2), DataLoader(SlowData(), batch_size=4))
    written = json.loads((tmp_path / "compute.json").read_text())
    assert written["data_seconds"] >= 2 * 0.04  # two items a batch
    # before steps 2..7 (not the first two), less the one after the validation at step 4
    assert len(meter.data_seconds) == 5
    assert len(meter.validations) == 2  # after steps 4 and 8; the sanity check is not one
    assert written["validation_batches"] == 3 and written["val_loader_batches"] == 10  # 40 items / 4
    assert written["validation_seconds"] >= 3 * (0.03 + 4 * 0.04)  # 3 batches of 4 slow items, each validated
