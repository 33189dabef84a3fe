"""Evaluation metrics of the fine-tuning tasks, as pure functions (no Lightning) so tests can check them
against hand computations.

- Detection / instance segmentation: COCO AP with pycocotools' ``COCOeval`` against the dataset's own
  annotation file (crowd regions, annotation areas and all), the reference implementation.
- Semantic segmentation: IoU per class from a confusion matrix accumulated over the whole dataset
  (torchmetrics ``MulticlassConfusionMatrix``, in ``SegmentationModule``; ``IoU_k = TP / (TP + FP + FN)``, pixels labelled 255 ignored), mIoU = mean over classes that occur
  in the ground truth or the predictions. This is the standard (PASCAL VOC / Cityscapes / mmseg);
  it equals torchmetrics ``MulticlassJaccardIndex`` (which also pools the confusion matrix over the
  dataset), not torchmetrics ``segmentation.MeanIoU`` (which averages per image).
- Classification: top-k accuracy (torchmetrics ``MulticlassAccuracy``, micro average).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassAccuracy

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# -------------------------------------------------------------------------------------- COCO AP
def detections_to_coco(
    image_id: int,
    boxes_xyxy: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    category_ids: Sequence[int],
    masks: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Detections of one image -> COCO result dicts (``bbox`` as x, y, w, h; ``category_id`` the
    dataset's own id of contiguous `labels`; ``segmentation`` a compressed RLE of each binary mask)."""
    if boxes_xyxy.numel() == 0:
        return []
    b = boxes_xyxy.detach().float().cpu()
    xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
    cats = torch.as_tensor(category_ids)[labels.detach().cpu().long()].tolist()
    out = [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 3) for v in box], "score": float(s)}
           for box, c, s in zip(xywh, cats, scores.detach().cpu().tolist())]
    if masks is not None:
        m = masks.detach().cpu().numpy().astype(np.uint8)  # (N, H, W) binary
        rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
        for res, rle in zip(out, rles):
            res["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return out


def _empty_results(coco_gt: COCO) -> COCO:
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                   "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO AP of `results` (COCO result dicts) against `coco_gt` on `image_ids` (default: all images).

    Returns AP (IoU .50:.95), AP50, AP75 and APs/APm/APl as fractions in [0, 1], exactly as pycocotools
    computes them, including its convention of -1.0 for an area range in which no ground-truth object
    falls (e.g. APl on a dataset without objects larger than 96 x 96 px): undefined, not zero.
    For ``segm`` the boxes are dropped from the results so that a detection's area (which decides
    small / medium / large) is its mask area, as in Detectron2."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got '{iou_type}'")
    results = copy.deepcopy(results)
    if iou_type == "segm":
        missing = sum("segmentation" not in r for r in results)
        if missing:
            raise ValueError(f"{missing} results have no 'segmentation' for segm evaluation")
        for r in results:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(COCO_KEYS)]
    return {k: float(v) for k, v in zip(COCO_KEYS, stats)}


# -------------------------------------------------------------------------- semantic segmentation
def iou_from_confusion(conf: torch.Tensor) -> tuple[float, list[float], list[bool]]:
    """(mIoU, per-class IoU, defined) from a dataset-level confusion matrix.

    A class absent from both the ground truth and the predictions (TP + FP + FN = 0) has an undefined
    IoU: as in torchmetrics ``MulticlassJaccardIndex`` it is reported as 0.0 (average=None) and left out of
    the mean (average="macro"); `defined` says which classes had any pixel."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    defined = union > 0
    iou = torch.where(defined, tp / union.clamp(min=1), torch.zeros_like(tp))
    miou = float(iou[defined].mean()) if bool(defined.any()) else 0.0
    return miou, [float(v) for v in iou.tolist()], [bool(d) for d in defined.tolist()]


# --------------------------------------------------------------------------------- classification
def topk_accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    """torchmetrics' streaming top-k accuracy over the samples (micro average), k capped at the number of
    classes (with fewer than 5 classes, top-5 counts every sample)."""
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")
