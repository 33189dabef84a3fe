"""Semantic segmentation fine-tuning: DeepLabV3 (torchvision ASPP head) on the backbone, pixel-wise cross
entropy with 255 ignored, mIoU from the dataset-level confusion matrix (``models.evaluation``).

The confusion matrix is accumulated with torchmetrics ``MulticlassConfusionMatrix`` (summed over ranks
under DDP); IoU_k = TP / (TP + FP + FN) per class, mIoU = mean over classes that occur in the ground
truth or the predictions; a class with no pixel in either shows IoU 0.0 (torchmetrics' convention) and
is not averaged. ``self.results`` = ``{"mIoU": float, "per_class_IoU": {name: float}}``.
Overlays (image | prediction | ground truth) are logged with ``log_images``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassConfusionMatrix

from callbacks.image_logging import log_images
from common.images import overlay_labels, to_uint8_image
from datamodules.segmentation import SegmentationBatch
from lightning_modules.finetune_base import FinetuneModule
from models.detectors import convert_norm
from models.evaluation import iou_from_confusion
from models.export import load_state_strict
from models.segmenters import DEFAULT_ATROUS_RATES, DEFAULT_DECODER_CHANNELS, build_deeplabv3

IGNORE_INDEX = 255
# the DeepLab head (models.segmenters.deeplab_head): 0 ASPP, 1 3x3 conv, 2 BN, 3 ReLU, 4 the 1x1 classifier
CLASSIFIER_PREFIX = "4."


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean pixel-wise cross entropy over the non-ignored pixels (0, not NaN, when every pixel is ignored)."""
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count


class SegmentationModule(FinetuneModule):
    task = "segmentation"
    takes_pretrained_decoder = True

    def __init__(self, cfg: DictConfig | dict, backbone_state: dict[str, torch.Tensor] | None = None,
                 backbone_source: str = "backbone", decoder_state: dict[str, torch.Tensor] | None = None,
                 decoder_source: str = "decoder") -> None:
        """`decoder_state`: pre-trained ASPP + 3x3 conv/BN (head keys ``0-2.*``, e.g. from contrastive
        pre-training), loaded strictly into the head; only the classifier ``4.*`` starts random. The head's
        ``model.atrous_rates`` / ``model.decoder_channels`` must match it (finetune.py sets them)."""
        super().__init__(cfg, backbone_state, backbone_source)
        convert_norm(self.backbone, str(self.cfg.model.norm), int(self.cfg.model.gn_groups))
        self.apply_backbone_freeze()
        m = self.cfg.model
        self.model = build_deeplabv3(self.backbone, self.num_classes,
                                     atrous_rates=tuple(int(r) for r in m.get("atrous_rates", DEFAULT_ATROUS_RATES)),
                                     channels=int(m.get("decoder_channels", DEFAULT_DECODER_CHANNELS)))
        if decoder_state is not None:
            load_state_strict(self.model.classifier, decoder_state, decoder_source, ignore_prefixes=(CLASSIFIER_PREFIX,))
        self.confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=IGNORE_INDEX)
        self._drawn: list[tuple[Any, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) class logits at the input resolution."""
        return self.model(self.normalize(images))["out"]

    def compute_losses(self, batch: SegmentationBatch) -> dict[str, torch.Tensor]:
        logits = self(batch.images)
        loss = segmentation_loss(logits, batch.labels)
        return {"loss": loss, "ce": loss.detach()}

    def on_validation_epoch_start(self) -> None:
        self.confusion.reset()
        self._drawn = []

    def validation_step(self, batch: SegmentationBatch, batch_idx: int) -> None:
        pred = self(batch.images).argmax(dim=1)
        self.confusion.update(pred, batch.labels)
        room = int(self.cfg.logging.num_images) - len(self._drawn)
        if room > 0 and self.images_due():
            for i in range(min(room, pred.shape[0])):
                self._drawn.append((batch.images[i].cpu(), pred[i].cpu(), batch.labels[i].cpu()))

    def on_validation_epoch_end(self) -> None:
        conf = self.confusion.compute()
        self.confusion.reset()
        miou, per_class, _ = iou_from_confusion(conf)
        self.record({"mIoU": miou, "per_class_IoU": dict(zip(self.class_names, per_class))})
        if self._drawn and self.images_due():
            images, captions = [], []
            for image, pred, label in self._drawn:
                rgb = to_uint8_image(image)
                valid = (label != IGNORE_INDEX).numpy()
                pred_np = np.where(valid, pred.numpy(), IGNORE_INDEX)  # padding / ignore shown grey
                images.append(np.concatenate([rgb, overlay_labels(rgb, pred_np, self.num_classes),
                                              overlay_labels(rgb, label.numpy(), self.num_classes)], axis=1))
                captions.append("image | prediction | ground truth")
            log_images(self.trainer, "val/segmentation", images, captions)
        self._drawn = []
