"""Warm-up + cosine/step LR: the lr at given steps against the formula, under accumulation and resume."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lr_schedule import WarmupCosineLR, timm_scheduler


def scheduled_lr(step: int, **schedule) -> float:
    """Learning rate of optimizer step `step` (0-based) under `timm_scheduler(**schedule)`."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=schedule["base_lr"])
    timm_scheduler(optimizer, **schedule).step_update(step)
    return float(optimizer.param_groups[0]["lr"])


def test_hand_computed_values():
    # The montage paper's warm-up: 0.2 -> 0.8 over 1,250 iterations, then cosine to 0 at 64k.
    kw = dict(base_lr=0.8, total_steps=64000, warmup_steps=1250, warmup_start_factor=0.25)
    assert scheduled_lr(0, **kw) == pytest.approx(0.2)
    assert scheduled_lr(625, **kw) == pytest.approx(0.5)
    assert scheduled_lr(1250, **kw) == pytest.approx(0.8)
    mid = 1250 + (64000 - 1250) // 2
    assert scheduled_lr(mid, **kw) == pytest.approx(0.4, rel=1e-4)
    assert scheduled_lr(64000, **kw) == pytest.approx(0.0, abs=1e-12)
    # min lr factor and step schedule (detection recipe: x0.1 at 9/13 and 12/13 of training)
    assert scheduled_lr(100, base_lr=1.0, total_steps=100, min_lr_factor=0.1) == pytest.approx(0.1)
    step_kw = dict(base_lr=0.02, total_steps=130, name="step", milestones=[9 / 13, 12 / 13])
    assert scheduled_lr(89, **step_kw) == pytest.approx(0.02)
    assert scheduled_lr(90, **step_kw) == pytest.approx(0.002)
    assert scheduled_lr(120, **step_kw) == pytest.approx(0.0002)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        scheduled_lr(0, base_lr=1.0, total_steps=1, name="poly")


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.peak_lr = 0.5

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=123.0)  # overwritten by the callback


class _RecordLR(Callback):
    def __init__(self):
        self.seen: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen[trainer.global_step] = optimizer.param_groups[0]["lr"]


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp_path, max_steps, callbacks, accumulate=1):
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accumulate_grad_batches=accumulate,
                     callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", devices=1)


def test_callback_sets_lr_per_optimizer_step_with_accumulation_and_resume(tmp_path):
    kw = dict(name="cosine", warmup_steps=4, warmup_start_factor=0.1, min_lr_factor=0.0)
    expected = {s: scheduled_lr(s, base_lr=0.5, total_steps=10, **kw) for s in range(10)}

    # A checkpoint at optimizer step 6 (16 batches of 4 with accumulation 2 = 8 steps per epoch).
    rec = _RecordLR()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    _trainer(tmp_path, 6, [WarmupCosineLR(**kw), rec, ckpt_cb], accumulate=2).fit(_Tiny(), _loader())
    assert sorted(rec.seen) == list(range(6))

    # The full 10-step schedule in one run, and resumed from step 6: both follow the formula.
    rec_full = _RecordLR()
    _trainer(tmp_path / "full", 10, [WarmupCosineLR(**kw), rec_full], accumulate=2).fit(_Tiny(), _loader())
    for step, lr in rec_full.seen.items():
        assert lr == pytest.approx(expected[step], rel=1e-9), step

    ckpt = tmp_path / "ck" / "epoch=0-step=6.ckpt"
    assert ckpt.is_file()
    rec_resume = _RecordLR()
    _trainer(tmp_path / "resume", 10, [WarmupCosineLR(**kw), rec_resume], accumulate=2).fit(
        _Tiny(), _loader(), ckpt_path=ckpt)
    assert sorted(rec_resume.seen) == [6, 7, 8, 9]
    for step, lr in rec_resume.seen.items():
        assert lr == pytest.approx(expected[step], rel=1e-9), step


def test_lr_scale_of_param_groups_is_respected(tmp_path):
    class _Groups(_Tiny):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": [self.layer.weight], "lr_scale": 0.1},
                                    {"params": [self.layer.bias]}], lr=1.0)

    seen = []

    class _Rec(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append([g["lr"] for g in optimizer.param_groups])

    _trainer(tmp_path, 3, [WarmupCosineLR(name="constant"), _Rec()]).fit(_Groups(), _loader())
    assert all(math.isclose(a, 0.05) and math.isclose(b, 0.5) for a, b in seen)


@pytest.mark.parametrize("max_epochs", [3, -1])
def test_warmup_epochs_count_the_epochs_steps_when_max_steps_caps_training(tmp_path, max_epochs):
    # 16 batches, accumulation 2: 8 optimizer steps per epoch. max_steps=10 caps the 3 epochs' 24 steps, so
    # the total (10) over the epochs (3) is not the steps per epoch: warmup_epochs=1 must be 8 steps, not 3.
    kw = dict(name="cosine", warmup_start_factor=0.1, min_lr_factor=0.0)
    schedule, rec = WarmupCosineLR(warmup_epochs=1, **kw), _RecordLR()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=10, max_epochs=max_epochs, accumulate_grad_batches=2,
                        callbacks=[schedule, rec], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    trainer.fit(_Tiny(), _loader())
    assert schedule.warmup_steps == 8 and schedule.total_steps == 10
    assert sorted(rec.seen) == list(range(10))
    for step, lr in rec.seen.items():
        assert lr == pytest.approx(scheduled_lr(step, base_lr=0.5, total_steps=10, warmup_steps=8, **kw), rel=1e-9)
