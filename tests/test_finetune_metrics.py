"""Evaluation functions of the fine-tuning tasks against hand computations and known answers:
COCO AP of ground truth used as predictions (1.0) and of shifted boxes (lower), mIoU from a
hand-computed confusion matrix (and agreement with torchmetrics' JaccardIndex), top-1/top-5 by hand,
and the labelled subsets (deterministic, nested)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from common.errors import DataWarning
from datamodules.finetune_common import labelled_subset
from datamodules.readers import load_coco
from models.evaluation import (
    coco_evaluate,
    detections_to_coco,
    iou_from_confusion,
    topk_accuracy,
)


@pytest.fixture(scope="module")
def val_coco(tiny_embedded):
    return load_coco(tiny_embedded / "annotations" / "instances_val.json", tiny_embedded / "images" / "val")


def _gt_as_predictions(ds, shift: float = 0.0, with_masks: bool = False) -> list[dict]:
    """Every ground-truth box of `ds` as a detection with score 1 (x shifted by `shift` x box width)."""
    results = []
    for im in ds.images:
        boxes = torch.from_numpy(im.boxes.copy())
        boxes[:, 0] += shift * boxes[:, 2]
        boxes[:, 2:] += boxes[:, :2]
        masks = None
        if with_masks:
            anns = ds.coco.loadAnns(im.ann_ids.tolist())
            masks = torch.from_numpy(mask_utils.decode([ds.coco.annToRLE(a) for a in anns]).transpose(2, 0, 1))
            if shift:
                masks = torch.roll(masks, shifts=int(shift * 20), dims=2)
        results += detections_to_coco(im.id, boxes, torch.ones(len(boxes)), torch.from_numpy(im.labels),
                                      ds.category_ids, masks)
    return results


def test_coco_ap_of_ground_truth_is_one_and_shifted_is_lower(val_coco):
    n_boxes = sum(len(im.boxes) for im in val_coco.images)
    assert n_boxes > 0
    perfect = coco_evaluate(val_coco.coco, _gt_as_predictions(val_coco), "bbox")
    assert set(perfect) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert perfect["AP"] == pytest.approx(1.0)
    assert perfect["AP50"] == pytest.approx(1.0)
    # area ranges: 1.0 where there is ground truth, pycocotools' -1 where there is none
    assert all(v == pytest.approx(1.0) or v == -1.0 for v in perfect.values())
    shifted = coco_evaluate(val_coco.coco, _gt_as_predictions(val_coco, shift=0.3), "bbox")
    assert 0.0 <= shifted["AP"] < 0.9
    assert shifted["AP75"] < perfect["AP75"]
    nothing = coco_evaluate(val_coco.coco, [], "bbox")
    assert nothing["AP"] == 0.0


def test_coco_segm_ap_of_ground_truth_masks_is_one(val_coco):
    perfect = coco_evaluate(val_coco.coco, _gt_as_predictions(val_coco, with_masks=True), "segm")
    assert perfect["AP"] == pytest.approx(1.0)
    worse = coco_evaluate(val_coco.coco, _gt_as_predictions(val_coco, shift=0.5, with_masks=True), "segm")
    assert worse["AP"] < 0.95


def test_coco_eval_restricted_to_evaluated_images(val_coco):
    """Evaluating only the images that were predicted (e.g. limit_val_batches) does not count the others as misses."""
    first = val_coco.images[0]
    assert len(first.boxes)
    only_first = [r for r in _gt_as_predictions(val_coco) if r["image_id"] == first.id]
    assert coco_evaluate(val_coco.coco, only_first, "bbox", image_ids=[first.id])["AP"] == pytest.approx(1.0)
    assert coco_evaluate(val_coco.coco, only_first, "bbox")["AP"] < 1.0


def test_coco_ap_scores_only_the_boxes_the_loader_kept(tiny_embedded, tmp_path):
    """Issue #14: NaN, negative-width, zero-width and outside boxes that load_coco drops, and a box it clips,
    are not scored as missed objects: the kept boxes as detections give AP 1.000 exactly (was 0.826)."""
    data = json.loads((tiny_embedded / "annotations" / "instances_val.json").read_text())
    image = data["images"][0]
    cat = data["categories"][0]["id"]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    degenerate = [[10, 10, 0, 20], [10, 10, -5, 20], [image["width"] + 5, 10, 10, 10], [float("nan"), 1, 2, 3]]
    for k, box in enumerate(degenerate):
        data["annotations"].append({"id": next_id + k, "image_id": image["id"], "category_id": cat, "bbox": box,
                                    "area": 100.0, "iscrowd": 0})
    first = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    first["bbox"] = [first["bbox"][0] - 40, first["bbox"][1], first["bbox"][2] + 40, first["bbox"][3]]  # clipped
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps(data))
    with pytest.warns(DataWarning, match="clipped 1 boxes, dropped 4 degenerate boxes"):
        ds = load_coco(ann, tiny_embedded / "images" / "val")
    perfect = coco_evaluate(ds.coco, _gt_as_predictions(ds), "bbox")
    assert perfect["AP"] == 1.0 and perfect["AP50"] == 1.0 and perfect["AP75"] == 1.0


def test_miou_against_hand_computed_confusion_matrix():
    # 3 classes, 255 ignored. Pixels (target -> pred):
    target = torch.tensor([[0, 0, 1, 1, 2], [2, 255, 1, 0, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 2], [0, 2, 2, 0, 2]])
    # (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) | (2,0) ignored (1,2) (0,0) (2,2)
    # rows = truth, cols = prediction
    expected = torch.tensor([[2, 1, 0],    # truth 0 predicted as 0, 1, 0
                             [0, 2, 1],    # truth 1 predicted as 1, 1, 2
                             [1, 0, 2]])   # truth 2 predicted as 2, 0, 2
    conf = MulticlassConfusionMatrix(3, ignore_index=255)(pred, target)  # as SegmentationModule counts
    assert torch.equal(conf, expected)
    miou, per_class, defined = iou_from_confusion(conf)
    # IoU_k = TP / (row + col - TP): class 0: 2/(3+3-2)=0.5; class 1: 2/(3+3-2)=0.5; class 2: 2/(3+3-2)=0.5
    hand = [2 / 4, 2 / 4, 2 / 4]
    assert per_class == pytest.approx(hand)
    assert miou == pytest.approx(sum(hand) / 3)
    assert defined == [True, True, True]
    tm = MulticlassJaccardIndex(3, ignore_index=255, average="macro")
    assert miou == pytest.approx(float(tm(pred, target)))


def test_torchmetrics_confusion_matrix_equals_the_bincount_it_replaces():
    """models.evaluation.confusion_matrix (a bincount over the non-ignored pixels, only the tests used it)
    gave way to torchmetrics' MulticlassConfusionMatrix, which SegmentationModule accumulates: the
    bincount, inline here, and torchmetrics give the same counts on random label maps with ignored pixels."""

    def bincount_confusion(pred, target, num_classes, ignore_index=255):
        keep = target != ignore_index
        t, p = target[keep].long(), pred[keep].long()
        return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)

    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 21):
        target = torch.randint(0, k, (3, 17, 23), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        pred = torch.randint(0, k, target.shape, generator=g)
        metric = MulticlassConfusionMatrix(k, ignore_index=255)
        metric.update(pred[:2], target[:2])  # accumulated over batches, as in validation
        metric.update(pred[2:], target[2:])
        torch.testing.assert_close(metric.compute(), bincount_confusion(pred, target, k))


def test_miou_unequal_classes_and_absent_class():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 3, 2])  # class 2, 3 only predicted on ignored pixels
    conf = MulticlassConfusionMatrix(4, ignore_index=255)(pred, target)
    miou, per_class, defined = iou_from_confusion(conf)
    # class 0: TP 3, truth 4, pred 4 -> 3/5 ; class 1: TP 1, truth 2, pred 2 -> 1/3 ; classes 2, 3 absent
    assert per_class == pytest.approx([3 / 5, 1 / 3, 0.0, 0.0])
    assert defined == [True, True, False, False]
    assert miou == pytest.approx((3 / 5 + 1 / 3) / 2)
    tm = MulticlassJaccardIndex(4, ignore_index=255, average="macro")
    assert miou == pytest.approx(float(tm(pred, target)))
    with pytest.raises((RuntimeError, ValueError)):  # a label outside 0..K-1 is never counted silently
        MulticlassConfusionMatrix(4, ignore_index=255)(pred, torch.tensor([0, 0, 0, 0, 1, 1, 7, 255]))


def test_topk_against_hand_computation():
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4],  # target 0: top1 hit
        [9.0, 8, 7, 6, 5, 4],  # target 4: rank 5 -> top5 hit only
        [1.0, 2, 3, 4, 5, 6],  # target 0: rank 6 -> miss
        [0.0, 5, 1, 1, 1, 1],  # target 1: top1 hit
    ])
    target = torch.tensor([0, 4, 0, 1])
    top1, top5 = topk_accuracy(6, 1), topk_accuracy(6, 5)
    for rows in (slice(0, 3), slice(3, 4)):  # streamed over two batches of unequal size: 2 / 4 and 3 / 4
        top1.update(logits[rows], target[rows])
        top5.update(logits[rows], target[rows])
    assert float(top1.compute()) == pytest.approx(2 / 4) and float(top5.compute()) == pytest.approx(3 / 4)
    # fewer than 5 classes: top-5 is every class
    few = topk_accuracy(3, 5)
    few.update(logits[:, :3], torch.tensor([0, 2, 0, 1]))
    assert float(few.compute()) == 1.0


def test_labelled_subsets_are_deterministic_and_nested():
    a = labelled_subset(1000, fraction=0.1, seed=0)
    b = labelled_subset(1000, fraction=0.2, seed=0)
    assert len(a) == 100 and len(b) == 200
    assert np.array_equal(a, labelled_subset(1000, fraction=0.1, seed=0))
    assert set(a) <= set(b)
    c = labelled_subset(1000, count=37, seed=0)
    assert len(c) == 37 and set(c) <= set(a)
    assert not np.array_equal(a, labelled_subset(1000, fraction=0.1, seed=1))
    assert np.array_equal(labelled_subset(7), np.arange(7))
    assert len(labelled_subset(12, fraction=0.01)) == 1  # at least one image
    from common.errors import UserError

    with pytest.raises(UserError, match="label-fraction"):
        labelled_subset(10, fraction=1.5)
    with pytest.raises(UserError, match="label-count"):
        labelled_subset(10, count=11)
