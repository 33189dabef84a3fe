"""EMA of weights (Lightning's EMAWeightAveraging, configured by cfg.ema): against a hand update."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cheaplunch.config import BASE_CONFIG
from cheaplunch.runner import standard_callbacks


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 2)
        self.peak_lr = 0.1

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _RecordWeights(Callback):
    """Raw weights right after every optimizer step (before any EMA swap)."""

    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_ema_weights_equal_hand_update_and_are_checkpointed(tmp_path):
    cfg = OmegaConf.load(BASE_CONFIG)
    cfg.ema.enabled = True
    cfg.ema.decay = 0.9
    cfg.checkpoint.every_n_steps = 1000
    cbs = [c for c in standard_callbacks(cfg, tmp_path, export=False)
           if type(c).__name__ in ("EMAWeightAveraging", "CheckpointOnInterrupt")]  # the latter writes last.ckpt
    assert any(type(c).__name__ == "EMAWeightAveraging" for c in cbs)
    rec = _RecordWeights()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :2] * 2), batch_size=4)
    model = _Tiny()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=7, callbacks=[*cbs, rec], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)

    # hand EMA: the first update copies the weights, then ema = d * ema + (1 - d) * w
    ema = {k: v.clone() for k, v in rec.history[0].items()}
    for weights in rec.history[1:]:
        for k in ema:
            ema[k] = 0.9 * ema[k] + 0.1 * weights[k]
    raw_last = rec.history[-1]
    for k, v in model.state_dict().items():  # after fit, the average is swapped into the module
        torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(v, raw_last[k])  # and it differs from the raw weights
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in ckpt["state_dict"].items():
        torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)
