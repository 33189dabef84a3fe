"""Montage pre-training (Zhou et al., "Cheaper Pre-training Lunch", ECCV 2020) as a LightningModule.

Backbone -> 1x1-conv dense classifier -> one of three objectives (cfg.model.objective):
`global` (area-weighted mixed label), `blockwise` (per-region pooling) or `erf_dense` (soft labels from
the effective receptive fields, refreshed by callbacks.erf_refresh.ERFRefresh).

Batches arrive as uint8 montages (datamodules/montage.py ``MontageBatch``); ``on_after_batch_transfer``
normalises them on the device (``normalize_images``: ImageNet mean/std, float32, in the model's memory
format), so ``training_step``/``compute_losses`` see float images. That hook is the one place where this
happens: ``compute_losses`` rejects a uint8 batch with a clear error (a caller that builds batches by
hand, as the tests do, applies ``on_after_batch_transfer(batch, 0)`` first, exactly as Lightning does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from callbacks.erf_refresh import ERFRefresh
from callbacks.image_logging import log_images
from common.errors import UserError
from common.images import denormalize, draw_cell_borders, normalize_images
from datamodules.montage import MontageBatch
from lightning_modules.base import PretrainModule
from models.heads import DenseClassifier
from models.montage_canvas import MontageLayout
from models.montage_losses import blockwise_loss, erf_dense_loss, global_loss

OBJECTIVES = ("global", "blockwise", "erf_dense")


class MontageModule(PretrainModule):
    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__(cfg)
        if self.cfg.model.objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {OBJECTIVES}, got '{self.cfg.model.objective}'")
        self.objective: str = self.cfg.model.objective
        self.layout = MontageLayout(canvas=(int(self.cfg.data.canvas),) * 2, split=tuple(self.cfg.data.split))

    # ---- layers and buffers that depend on the data ---------------------------------------------
    def build_heads(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        configured = self.cfg.model.get("num_classes")
        num_classes = int(datamodule.num_classes) if datamodule is not None else int(configured)
        if configured is not None and int(configured) != num_classes:
            raise UserError(f"model.num_classes={configured}, but the data has {num_classes} classes (object classes "
                            "+ background); leave it null to take it from the data")
        self.num_classes = num_classes
        self.classifier = DenseClassifier(self.backbone.num_features, num_classes)
        fh, fw = self.feature_size()
        self.register_buffer("position_regions", self.layout.position_regions((fh, fw)), persistent=False)
        self.register_buffer("region_areas", self.layout.region_areas(), persistent=False)
        # ERF soft-label weights (h, w, 4); start as one-hot on the own region (= block-wise) until the
        # first refresh. Persistent: a resumed run continues with the same weights.
        one_hot = torch.nn.functional.one_hot(self.position_regions, 4).float()
        self.register_buffer("erf_weights", one_hot)
        self.register_buffer("erf_step", torch.tensor(-1, dtype=torch.long))

    def feature_size(self) -> tuple[int, int]:
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            out = self.backbone(torch.zeros(1, 3, *self.layout.canvas))
            self.backbone.train(was_training)
        return int(out.shape[-2]), int(out.shape[-1])

    def on_train_start(self) -> None:
        """Log the sample bank's counts per class and aspect group (also printed when it is built)."""
        bank = getattr(self.trainer.datamodule, "bank", None)
        if bank is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_hyperparams({"sample_bank": bank.counts()})

    def configure_callbacks(self) -> list[Callback]:
        erf = self.cfg.model.erf
        if self.objective != "erf_dense":
            return []
        return [ERFRefresh(every_n_steps=int(erf.refresh_every), num_montages=int(erf.num_montages),
                           tau=float(self.cfg.model.tau), chunk_size=erf.chunk_size, bn_mode=erf.bn_mode)]

    # ---- training -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense class logits (B, K, h, w)."""
        return self.classifier(self.backbone(images))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 montages -> ImageNet-normalised float32 on the device, channels-last if
        ``runtime.channels_last`` (``normalize_images``); other batches pass through."""
        if isinstance(batch, MontageBatch) and batch.images.dtype == torch.uint8:
            images = normalize_images(batch.images, channels_last=bool(self.cfg.runtime.channels_last))
            return dataclasses.replace(batch, images=images)
        return batch

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        images = batch.images
        if not images.is_floating_point():
            raise TypeError(
                f"compute_losses got {images.dtype} images: montage batches are normalised in "
                "on_after_batch_transfer; apply module.on_after_batch_transfer(batch, 0) to a hand-made batch"
            )
        if self.cfg.runtime.channels_last:  # no-op for batches from on_after_batch_transfer
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self(images)
        labels = batch.labels
        extra: dict[str, torch.Tensor] = {}
        if self.objective == "global":
            loss = global_loss(logits, labels, self.region_areas)
        elif self.objective == "blockwise":
            loss = blockwise_loss(logits, labels, self.position_regions)
        else:
            loss, extra = erf_dense_loss(logits, labels, self.erf_weights, self.position_regions)
        with torch.no_grad():
            region_acc = self.region_accuracy(logits, labels)
        self._maybe_log_montages(batch)
        terms = {f"loss_{self.objective}/{name}": value for name, value in extra.items()}
        return {"loss": loss, f"loss_{self.objective}": loss.detach(), **terms, "region_acc": region_acc}

    def region_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fraction of cells whose region-pooled prediction equals the cell's label (monitoring only)."""
        hits, count = logits.new_zeros(()), 0
        for r in range(4):
            sel = self.position_regions == r
            if sel.any():
                pred = logits[:, :, sel].mean(dim=2).argmax(dim=1)
                hits = hits + (pred == labels[:, r]).float().sum()
                count += labels.shape[0]
        return hits / max(count, 1)

    def _maybe_log_montages(self, batch: Any) -> None:
        if not self.images_due():
            return
        n = min(int(self.cfg.logging.num_images), batch.images.shape[0])
        images = denormalize(batch.images[:n])
        names = getattr(self.trainer.datamodule, "class_names", None)
        captions = [", ".join(_label_name(int(v), names) for v in row) for row in batch.labels[:n]]
        log_images(self.trainer, "montages", [draw_cell_borders(im, self.layout) for im in images], captions)


def _label_name(label: int, names: list[str] | None) -> str:
    if names is not None and label < len(names):
        return names[label]
    return str(label)
