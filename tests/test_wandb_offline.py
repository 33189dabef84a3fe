"""W&B without an API key: the logger falls back to offline and the run file holds what was logged."""

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.image_logging import log_images
from cheaplunch.config import BASE_CONFIG
from cheaplunch.runner import make_logger, wandb_mode
from tests.wandb_offline import find_run_file, read_offline_run


def test_mode_without_key_is_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss)
        if batch_idx == 1:
            log_images(self.trainer, "montages", [torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()], ["black"])
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_offline_run_file_has_config_history_and_images(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.load(BASE_CONFIG)
    logger = make_logger("wandb", tmp_path, cfg)
    logger.log_hyperparams({"optim": {"lr": 0.123}})
    x = torch.randn(16, 2)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Tiny(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
    logger.experiment.finish()
    run = read_offline_run(find_run_file(tmp_path))
    losses = [h["train/loss"] for h in run["history"] if "train/loss" in h]
    assert len(losses) == 4
    assert abs(losses[-1] - float(trainer.logged_metrics["train/loss"])) < 1e-6
    assert run["config"]["optim"] == {"lr": 0.123}
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/montages_*.png"))
    assert (tmp_path / "images" / "montages").is_dir()  # the PNG copy every logger gets
    assert (tmp_path / "wandb_run_id").is_file()
