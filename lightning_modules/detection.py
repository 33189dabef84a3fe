"""Detection / instance segmentation fine-tuning: RetinaNet, Faster R-CNN or Mask R-CNN (torchvision) on an
FPN over the backbone (``models.detectors``), evaluated with COCO AP (pycocotools) on the val split.

Losses are torchvision's own terms (RetinaNet: classification (focal) + bbox_regression; R-CNNs:
RPN objectness + RPN box + classifier + box regression (+ mask)), each logged as ``train/<term>``.
Evaluation: the detections of every val image are converted to COCO results, gathered from all ranks,
and scored by ``models.evaluation.coco_evaluate`` against the val annotation file; ``self.results`` =
``{"bbox": {AP, AP50, AP75, APs, APm, APl}}`` (+ ``"segm"`` for Mask R-CNN). Prediction images (boxes,
masks, class and score) are logged with ``callbacks.image_logging.log_images``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from callbacks.image_logging import log_images
from common.images import draw_detections, to_uint8_image
from datamodules.detection import DetectionBatch
from lightning_modules.finetune_base import FinetuneModule
from models.detectors import build_detector, convert_norm, freeze_stages, label_offset
from models.evaluation import coco_evaluate, detections_to_coco


class DetectionModule(FinetuneModule):
    task = "detection"

    def __init__(self, cfg: DictConfig | dict, backbone_state: dict[str, torch.Tensor] | None = None,
                 backbone_source: str = "backbone") -> None:
        super().__init__(cfg, backbone_state, backbone_source)
        m = self.cfg.model
        self.kind = str(m.detector)
        # Order matters: pre-trained weights are in (base class), then BN is frozen / converted, then
        # the stem + first stages are frozen, then the detector wraps the backbone.
        convert_norm(self.backbone, str(m.norm), int(m.gn_groups))
        freeze_stages(self.backbone, int(m.frozen_stages))
        self.apply_backbone_freeze()
        self.train_sizes = tuple(int(s) for s in m.train_sizes)
        self.test_size = int(m.test_size)
        self.detector = build_detector(
            self.kind, self.backbone, self.num_classes, min_size=self.train_sizes, max_size=int(m.max_size),
            anchor_sizes=list(m.anchor_sizes), fpn_channels=int(m.fpn_channels),
            detections_per_img=int(m.detections_per_img), score_thresh=float(m.score_thresh),
            rpn_pre_nms_top_n_train=int(m.rpn_pre_nms_top_n_train), rpn_post_nms_top_n_train=int(m.rpn_post_nms_top_n_train),
            rpn_pre_nms_top_n_test=int(m.rpn_pre_nms_top_n_test), rpn_post_nms_top_n_test=int(m.rpn_post_nms_top_n_test),
            box_batch_size_per_image=int(m.box_batch_size_per_image),
            head_norm=str(m.head_norm), gn_groups=int(m.gn_groups),
        )
        self.offset = label_offset(self.kind)
        self.with_masks = self.kind == "mask_rcnn"
        self._results: list[dict[str, Any]] = []
        self._image_ids: list[int] = []
        self._drawn: list[tuple[Any, ...]] = []

    # ---- model ----------------------------------------------------------------------------------
    def compile_targets(self) -> list[torch.nn.Module]:
        """``runtime.compile`` compiles the backbone + FPN (the detector calls it; the FPN takes the
        backbone's features through ``forward_intermediates``, never through the backbone's ``__call__``)."""
        return [self.detector.backbone]

    def _set_size(self, training: bool) -> None:
        """Multi-scale training (a random short side from model.train_sizes per batch), one size at test."""
        self.detector.transform.min_size = self.train_sizes if training else (self.test_size,)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections per image in its own pixel grid; labels 0..C-1 (the dataset's contiguous labels)."""
        self._set_size(False)
        outputs = self.detector(images)
        for out in outputs:
            out["labels"] = out["labels"] - self.offset
        return outputs

    def compute_losses(self, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        self._set_size(True)
        targets = [{**t, "labels": t["labels"] + self.offset} for t in batch.targets]
        terms = self.detector(batch.images, targets)
        loss = torch.stack(list(terms.values())).sum()
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    # ---- evaluation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._results, self._image_ids, self._drawn = [], [], []

    def validation_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        outputs = self(batch.images)
        category_ids = self.trainer.datamodule.val_coco.category_ids
        for image, out, image_id in zip(batch.images, outputs, batch.image_ids):
            masks = (out["masks"][:, 0] > 0.5) if self.with_masks else None
            self._results.extend(detections_to_coco(image_id, out["boxes"], out["scores"], out["labels"],
                                                    category_ids, masks))
            self._image_ids.append(int(image_id))
            if len(self._drawn) < int(self.cfg.logging.num_images) and self.images_due():
                self._drawn.append((image, {k: v.detach().cpu() for k, v in out.items()}, image_id))

    def on_validation_epoch_end(self) -> None:
        results, image_ids = self._results, self._image_ids
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(gathered, (results, image_ids))
            results = [r for part in gathered for r in part[0]]
            image_ids = [i for part in gathered for i in part[1]]
        coco_gt = self.trainer.datamodule.val_coco.coco
        metrics = {"bbox": coco_evaluate(coco_gt, results, "bbox", image_ids)}
        if self.with_masks:
            metrics["segm"] = coco_evaluate(coco_gt, results, "segm", image_ids)
        self.record(metrics)
        self._draw()

    def _draw(self) -> None:
        if not self._drawn or not self.images_due():
            return
        threshold = float(self.cfg.logging.score_threshold)
        images, captions = [], []
        for image, out, image_id in self._drawn:
            keep = out["scores"] >= threshold
            masks = (out["masks"][keep, 0] > 0.5).numpy() if self.with_masks else None
            images.append(draw_detections(to_uint8_image(image), out["boxes"][keep].numpy(), out["labels"][keep].numpy(),
                                          out["scores"][keep].numpy(), self.class_names, masks))
            captions.append(f"image {image_id}: {int(keep.sum())} detections >= {threshold}")
        log_images(self.trainer, "val/predictions", images, captions)
        self._drawn = []
