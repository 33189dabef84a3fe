"""Planning the montage sample bank: which boxes to cut from which image, as pure geometry (no pixels: cheap, and
what the sampling-rule tests check). The rules (expanded positives, negatives with IoU 0 against them, crowd
regions avoided, determinism per image) are described in ``datamodules/sample_bank.py``'s docstring; the bank
cuts and stores the planned crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import UserError

if TYPE_CHECKING:
    from datamodules.readers import CocoDataset

_POS_STREAM, _NEG_STREAM = 0, 1  # independent random streams per image

NEGATIVES_AVOID: tuple[str, ...] = ("expanded_positives", "boxes")  # what negatives have IoU 0 with
DEFAULT_NEGATIVES_AVOID = "expanded_positives"  # the paper's mutually exclusive sets (module docstring)


def check_negatives_avoid(value: str) -> str:
    """``value`` if it is one of ``NEGATIVES_AVOID``, else a UserError naming the option."""
    if value not in NEGATIVES_AVOID:
        raise UserError(f"data.negatives_avoid must be one of {', '.join(NEGATIVES_AVOID)}, got {value!r}")
    return value



@dataclass
class SamplePlan:
    """Boxes to cut, one row per sample, in build order (COCO id order, positives before negatives)."""

    image_index: np.ndarray  # (N,) int64 position in the sorted image list
    image_ids: np.ndarray  # (N,) int64 COCO image id
    boxes: np.ndarray  # (N, 4) int64 x, y, w, h in source pixels
    labels: np.ndarray  # (N,) int64, C = background
    category_ids: np.ndarray  # (N,) int64 COCO category id, -1 for background
    ann_ids: np.ndarray  # (N,) int64 COCO annotation id of a positive's GT box, -1 for background
    skipped_small_boxes: int
    negatives_short: int


def _expand_positives(
    boxes: np.ndarray, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """Integer (x, y, w, h) of each GT box's hull with corners moved outward by U[0, w/2] / U[0, h/2]."""
    x1 = np.floor(boxes[:, 0].astype(np.float64))
    y1 = np.floor(boxes[:, 1].astype(np.float64))
    x2 = np.ceil(boxes[:, 0].astype(np.float64) + boxes[:, 2])
    y2 = np.ceil(boxes[:, 1].astype(np.float64) + boxes[:, 3])
    w = boxes[:, 2].astype(np.float64)
    h = boxes[:, 3].astype(np.float64)
    u = rng.random((len(boxes), 4))  # dx1, dy1, dx2, dy2 as fractions of w/2, h/2
    nx1 = np.clip(x1 - np.floor(u[:, 0] * w / 2), 0, width)
    ny1 = np.clip(y1 - np.floor(u[:, 1] * h / 2), 0, height)
    nx2 = np.clip(x2 + np.floor(u[:, 2] * w / 2), 0, width)
    ny2 = np.clip(y2 + np.floor(u[:, 3] * h / 2), 0, height)
    return np.stack([nx1, ny1, nx2 - nx1, ny2 - ny1], axis=1).astype(np.int64)


def _sample_negatives(
    count: int,
    avoid_xyxy: np.ndarray,
    width: int,
    height: int,
    sizes: np.ndarray,
    rng: np.random.Generator,
    max_tries: int,
) -> np.ndarray:
    """Up to ``count`` integer (x, y, w, h) boxes with empty intersection with every ``avoid_xyxy`` box."""
    out: list[np.ndarray] = []
    for _ in range(count):
        cand = sizes[rng.integers(0, len(sizes), max_tries)]  # (k, 2) w, h of random positives
        cw, ch = cand[:, 0], cand[:, 1]
        fits = (cw <= width) & (ch <= height)
        # uniform position where the candidate fits (ignored for candidates that do not fit)
        cx = np.floor(rng.random(max_tries) * np.maximum(width - cw + 1, 1)).astype(np.int64)
        cy = np.floor(rng.random(max_tries) * np.maximum(height - ch + 1, 1)).astype(np.int64)
        if len(avoid_xyxy):
            ix = np.minimum(cx[:, None] + cw[:, None], avoid_xyxy[None, :, 2]) - np.maximum(
                cx[:, None], avoid_xyxy[None, :, 0]
            )
            iy = np.minimum(cy[:, None] + ch[:, None], avoid_xyxy[None, :, 3]) - np.maximum(
                cy[:, None], avoid_xyxy[None, :, 1]
            )
            free = ((ix <= 0) | (iy <= 0)).all(axis=1)
        else:
            free = np.ones(max_tries, bool)
        ok = np.flatnonzero(fits & free)
        if len(ok):
            j = ok[0]
            out.append(np.array([cx[j], cy[j], cw[j], ch[j]], np.int64))
    return np.stack(out) if out else np.zeros((0, 4), np.int64)


def _crowd_boxes(coco: Any) -> dict[int, np.ndarray]:
    """xyxy boxes of ``iscrowd=1`` annotations per image id, from the pycocotools object if present."""
    api = getattr(coco, "coco", None)
    img_to_anns = getattr(api, "imgToAnns", None)
    out: dict[int, np.ndarray] = {}
    if not img_to_anns:
        return out
    for img_id, anns in img_to_anns.items():
        crowd = [a["bbox"] for a in anns if a.get("iscrowd", 0) and len(a.get("bbox", ())) == 4]
        if crowd:
            b = np.asarray(crowd, np.float64)
            out[int(img_id)] = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    return out


def plan_samples(
    coco: CocoDataset,
    *,
    seed: int,
    neg_ratio: float = 0.1,
    neg_max_tries: int = 50,
    min_box_side: float = 1.0,
    negatives_avoid: str = DEFAULT_NEGATIVES_AVOID,
) -> SamplePlan:
    """Decide every sample's box and label (see the module docstring for the rules)."""
    if neg_ratio < 0:
        raise UserError(f"neg_ratio must be >= 0, got {neg_ratio}")
    check_negatives_avoid(negatives_avoid)
    background = int(coco.num_classes)
    images = sorted(coco.images, key=lambda im: int(im.id))
    crowd = _crowd_boxes(coco)

    # per image: (image position, image id, boxes, labels, category ids, annotation ids)
    rows: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    avoid_per_image: list[np.ndarray] = []  # xyxy boxes a negative must not overlap
    skipped = 0
    for i, im in enumerate(images):
        boxes = np.asarray(im.boxes, np.float32).reshape(-1, 4)
        keep = (boxes[:, 2] >= min_box_side) & (boxes[:, 3] >= min_box_side)
        skipped += int((~keep).sum())
        gt = boxes.astype(np.float64)
        gt_xyxy = np.concatenate([gt[:, :2], gt[:, :2] + gt[:, 2:]], axis=1)
        if int(im.id) in crowd:
            gt_xyxy = np.concatenate([gt_xyxy, crowd[int(im.id)]])
        rng = np.random.default_rng([seed, _POS_STREAM, int(im.id)])
        pos = _expand_positives(boxes[keep], int(im.width), int(im.height), rng)
        if negatives_avoid == "expanded_positives":
            pos_xyxy = np.concatenate([pos[:, :2], pos[:, :2] + pos[:, 2:]], axis=1).astype(np.float64)
            avoid_per_image.append(np.concatenate([gt_xyxy, pos_xyxy]))
        else:
            avoid_per_image.append(gt_xyxy)
        rows.append((
            i, int(im.id), pos,
            np.asarray(im.labels, np.int64).reshape(-1)[keep],
            np.asarray(im.category_ids, np.int64).reshape(-1)[keep],
            np.asarray(im.ann_ids, np.int64).reshape(-1)[keep],
        ))

    pos_sizes = np.concatenate([r[2][:, 2:] for r in rows]) if rows else np.zeros((0, 2), np.int64)
    n_pos_cum = np.cumsum([len(r[2]) for r in rows])
    out_rows: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    placed = 0
    short = 0
    for row, cum in zip(rows, n_pos_cum):
        out_rows.append(row)
        i, img_id = row[0], row[1]
        quota = int(np.floor(neg_ratio * cum + 1e-9)) - placed  # running quota: carries shortfalls over
        if quota <= 0 or len(pos_sizes) == 0:
            continue
        im = images[i]
        rng = np.random.default_rng([seed, _NEG_STREAM, img_id])
        neg = _sample_negatives(quota, avoid_per_image[i], int(im.width), int(im.height), pos_sizes, rng,
                                neg_max_tries)
        placed += len(neg)
        if len(neg):
            none = np.full(len(neg), -1, np.int64)
            out_rows.append((i, img_id, neg, np.full(len(neg), background, np.int64), none, none))
    if pos_sizes.size:
        short = int(np.floor(neg_ratio * n_pos_cum[-1] + 1e-9)) - placed

    def cat(k: int, shape: tuple[int, ...]) -> np.ndarray:
        parts = [r[k] for r in out_rows]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(shape, np.int64)

    counts = [len(r[2]) for r in out_rows]
    return SamplePlan(
        image_index=np.repeat([r[0] for r in out_rows], counts).astype(np.int64),
        image_ids=np.repeat([r[1] for r in out_rows], counts).astype(np.int64),
        boxes=cat(2, (0, 4)).reshape(-1, 4),
        labels=cat(3, (0,)),
        category_ids=cat(4, (0,)),
        ann_ids=cat(5, (0,)),
        skipped_small_boxes=skipped,
        negatives_short=max(short, 0),
    )
