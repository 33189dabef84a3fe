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


class _Exporting(_Tiny):
    def export_backbone(self, out_dir, global_step):
        path = out_dir / "backbone.pt"
        torch.save({"global_step": global_step, **{k: v.clone() for k, v in self.state_dict().items()}}, path)
        return path


def test_a_run_resumed_at_its_last_step_still_writes_its_compute_and_exports_the_average(tmp_path):
    """Killed after its last checkpoint (e.g. in the final validation), a re-run resumes at max_steps and Lightning
    skips the training loop: compute.json and backbone.pt must still be written, with the EMA weights."""
    import json

    cfg = OmegaConf.load(BASE_CONFIG)
    cfg.ema.enabled, cfg.ema.decay = True, 0.9
    cfg.checkpoint.every_n_steps = 7
    cfg.logging.flops_steps = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :2] * 2), batch_size=4)

    def fit(ckpt_path=None):
        trainer = L.Trainer(default_root_dir=tmp_path, max_steps=7, logger=False, enable_progress_bar=False,
                            callbacks=standard_callbacks(cfg, tmp_path, export=True), enable_model_summary=False,
                            accelerator="cpu")
        trainer.fit(_Exporting(), loader, ckpt_path=ckpt_path)

    fit()
    first_compute = json.loads((tmp_path / "compute.json").read_text())
    first_export = torch.load(tmp_path / "backbone.pt")
    (tmp_path / "compute.json").unlink()
    (tmp_path / "backbone.pt").unlink()
    fit(tmp_path / "checkpoints" / "last.ckpt")  # the loop is skipped: nothing trains

    again = json.loads((tmp_path / "compute.json").read_text())
    assert again["optimizer_steps"] == 7 and first_compute["optimizer_steps"] == 7
    for key in ("flops_per_step", "total_flops", "images_seen"):
        assert again[key] == first_compute[key]
    exported = torch.load(tmp_path / "backbone.pt")
    assert exported.pop("global_step") == first_export.pop("global_step") == 7
    raw = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["current_model_state"]
    for k, v in exported.items():
        torch.testing.assert_close(v, first_export[k])  # the average, as after the full run
        assert not torch.allclose(v, raw[k])  # not the raw weights the resumed module holds
