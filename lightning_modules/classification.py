"""Classification fine-tuning: global average pooling + a linear layer on the backbone.

- Full fine-tuning (``model.freeze_backbone=false``, the default): everything trains, with the ConvNeXt V2
  fine-tuning switches (Woo et al., CVPR 2023, official ``main_finetune.py``), each through timm: layer-wise
  lr decay (``optim.layer_decay``), drop path (``model.backbone_kwargs.drop_path_rate``), label smoothing,
  Mixup / CutMix (``timm.data.Mixup``), RandAugment (``data.rand_augment``, in the DataModule), random
  erasing (``timm.data.RandomErasing``) and EMA (``ema.enabled``, Lightning's ``EMAWeightAveraging``).
- Linear probe (``model.freeze_backbone=true``): the backbone gets no gradients and its BN layers stay in
  eval mode, so only the linear classifier learns (the standard protocol for judging frozen features).

The head is the backbone's own timm head with average pooling and no classifier, then a new linear layer:
for ConvNeXt that is global average pool -> LayerNorm (the backbone's ``head.norm``) -> Linear, as in the
official ConvNeXt V2 code; for ResNet global average pool -> Linear.

Metrics: top-1 / top-5 accuracy over the whole val split (counts summed over ranks); with fewer than
5 classes top-5 is over all classes (= 1.0).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from callbacks.image_logging import log_images
from common.errors import UserError
from common.images import to_uint8_image
from datamodules.classification import ClassificationBatch
from lightning_modules.finetune_base import FinetuneModule
from models.detectors import convert_norm
from models.evaluation import topk_accuracy


class ClassificationModule(FinetuneModule):
    task = "classification"

    def __init__(self, cfg: DictConfig | dict, backbone_state: dict[str, torch.Tensor] | None = None,
                 backbone_source: str = "backbone") -> None:
        super().__init__(cfg, backbone_state, backbone_source)
        m, d = self.cfg.model, self.cfg.data
        convert_norm(self.backbone, str(m.norm), int(m.gn_groups))
        # timm's own head, pooled and without classifier: ConvNeXt -> GAP then its head LayerNorm (official
        # ConvNeXt V2 order); ResNet -> GAP. The state_dict keys stay those of the exported backbone.
        self.backbone.reset_classifier(0, global_pool="avg")
        self.apply_backbone_freeze()
        features = int(self.backbone.num_features)
        # A parameter-free BN before the probe (MAE's linear-probe recipe) makes the probe insensitive to
        # the scale of the frozen features; off by default.
        self.probe_norm = nn.BatchNorm1d(features, affine=False) if m.probe_bn else nn.Identity()
        self.dropout = nn.Dropout(float(m.dropout))
        self.head = nn.Linear(features, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=float(m.head_init_std))
        nn.init.zeros_(self.head.bias)
        self.mixup = mixup_from_config(self.cfg, self.num_classes)
        self.random_erasing = (RandomErasing(float(d.random_erasing), mode="pixel", device="cpu")
                               if float(d.random_erasing) > 0 else None)
        self.top1 = topk_accuracy(self.num_classes, 1)
        self.top5 = topk_accuracy(self.num_classes, 5)
        self._drawn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch: backbone (pooled, ConvNeXt: + LayerNorm) -> [probe BN] -> Linear."""
        with torch.no_grad() if self.freeze_backbone else contextlib.nullcontext():
            pooled = self.backbone(x)
        return self.head(self.dropout(self.probe_norm(pooled)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.normalize(images))

    def compute_losses(self, batch: ClassificationBatch) -> dict[str, torch.Tensor]:
        x = self.normalize(batch.images)
        if self.random_erasing is not None:
            x = self.random_erasing(x)  # per image, on the normalised batch (timm's order)
        if self.mixup is not None:  # soft targets, label smoothing included
            x, targets = self.mixup(x, batch.labels)
            logits = self.classify(x)
            loss = SoftTargetCrossEntropy()(logits, targets)
        else:
            logits = self.classify(x)
            loss = F.cross_entropy(logits, batch.labels, label_smoothing=float(self.cfg.model.label_smoothing))
        acc = (logits.detach().argmax(1) == batch.labels).float().mean()
        return {"loss": loss, "ce": loss.detach(), "acc": acc}

    def on_validation_epoch_start(self) -> None:
        for m in (self.top1, self.top5):
            m.reset()
        self._drawn = None

    def validation_step(self, batch: ClassificationBatch, batch_idx: int) -> None:
        logits = self(batch.images)
        self.top1.update(logits, batch.labels)
        self.top5.update(logits, batch.labels)
        if self._drawn is None and self.images_due():
            n = int(self.cfg.logging.num_images)
            self._drawn = (batch.images[:n].cpu(), logits[:n].argmax(1).cpu(), batch.labels[:n].cpu())

    def on_validation_epoch_end(self) -> None:
        self.record({"top1": float(self.top1.compute()), "top5": float(self.top5.compute())})
        if self._drawn is not None and self.images_due():
            images, pred, label = self._drawn
            names = self.class_names
            log_images(self.trainer, "val/classification", [to_uint8_image(im) for im in images],
                       [f"pred {names[int(p)]} / true {names[int(t)]}" for p, t in zip(pred, label)])
        self._drawn = None


def mixup_from_config(cfg: DictConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix from ``data.mixup_alpha`` / ``data.cutmix_alpha`` (None when both are 0)."""
    d = cfg.data
    if float(d.mixup_alpha) <= 0 and float(d.cutmix_alpha) <= 0:
        return None
    if int(d.batch_size) % 2:
        raise UserError(f"data.batch_size={d.batch_size}: Mixup / CutMix (timm, mode 'batch') needs an even batch")
    return Mixup(mixup_alpha=float(d.mixup_alpha), cutmix_alpha=float(d.cutmix_alpha), prob=float(d.mixup_prob),
                 switch_prob=float(d.mixup_switch_prob), mode="batch",
                 label_smoothing=float(cfg.model.label_smoothing), num_classes=num_classes)
