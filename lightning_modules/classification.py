"""Classification fine-tuning: global average pooling + a linear layer on the backbone.

- Linear probe (``model.freeze_backbone=true``): the backbone gets no gradients and its BN layers stay in
  eval mode, so only the linear classifier learns (the standard protocol for judging frozen features).
- Full fine-tuning (``model.freeze_backbone=false``): everything trains.

Metrics: top-1 / top-5 accuracy over the whole val split (counts summed over ranks); with fewer than
5 classes top-5 is over all classes (= 1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchmetrics.aggregation import SumMetric

from callbacks.image_logging import log_images
from datamodules.classification import ClassificationBatch
from lightning_modules.finetune_base import FinetuneModule, to_uint8_image
from models.detectors import convert_norm
from models.evaluation import topk_correct


class ClassificationModule(FinetuneModule):
    task = "classification"

    def __init__(self, cfg: DictConfig | dict, backbone_state: dict[str, torch.Tensor] | None = None,
                 backbone_source: str = "backbone") -> None:
        super().__init__(cfg, backbone_state, backbone_source)
        convert_norm(self.backbone, str(self.cfg.model.norm), int(self.cfg.model.gn_groups))
        self.apply_backbone_freeze()
        features = int(self.backbone.num_features)
        # A parameter-free BN before the probe (MAE's linear-probe recipe) makes the probe insensitive to
        # the scale of the frozen features; off by default.
        self.probe_norm = nn.BatchNorm1d(features, affine=False) if self.cfg.model.probe_bn else nn.Identity()
        self.dropout = nn.Dropout(float(self.cfg.model.dropout))
        self.head = nn.Linear(features, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.hits1 = SumMetric()
        self.hits5 = SumMetric()
        self.seen = SumMetric()
        self._drawn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) globally average-pooled backbone features."""
        x = self.normalize(images)
        if self.freeze_backbone:
            with torch.no_grad():
                fmap = self.backbone(x)
        else:
            fmap = self.backbone(x)
        return fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.probe_norm(self.features(images))))

    def compute_losses(self, batch: ClassificationBatch) -> dict[str, torch.Tensor]:
        logits = self(batch.images)
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=float(self.cfg.model.label_smoothing))
        acc = (logits.detach().argmax(1) == batch.labels).float().mean()
        return {"loss": loss, "ce": loss.detach(), "acc": acc}

    def on_validation_epoch_start(self) -> None:
        for m in (self.hits1, self.hits5, self.seen):
            m.reset()
        self._drawn = None

    def validation_step(self, batch: ClassificationBatch, batch_idx: int) -> None:
        logits = self(batch.images)
        hits = topk_correct(logits, batch.labels, (1, 5))
        self.hits1.update(torch.tensor(float(hits[1]), device=self.device))
        self.hits5.update(torch.tensor(float(hits[5]), device=self.device))
        self.seen.update(torch.tensor(float(batch.labels.numel()), device=self.device))
        if self._drawn is None and self.images_due():
            n = int(self.cfg.logging.num_images)
            self._drawn = (batch.images[:n].cpu(), logits[:n].argmax(1).cpu(), batch.labels[:n].cpu())

    def on_validation_epoch_end(self) -> None:
        seen = float(self.seen.compute())
        top1 = float(self.hits1.compute()) / max(seen, 1.0)
        top5 = float(self.hits5.compute()) / max(seen, 1.0)
        self.record({"top1": top1, "top5": top5})
        if self._drawn is not None and self.images_due():
            images, pred, label = self._drawn
            names = self.class_names
            log_images(self.trainer, "val/classification", [to_uint8_image(im) for im in images],
                       [f"pred {names[int(p)]} / true {names[int(t)]}" for p, t in zip(pred, label)])
        self._drawn = None
