"""Compositing of the embedded dataset: objects (RGBA photo cut-outs) pasted in order onto a background, with
the annotations recomputed from what stays visible (see ``tools/embedded/builder.py``'s docstring for the rules:
instance masks minus later objects, soft alpha edges and unannotated objects ignored in the semantic PNG).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from datamodules.readers import IGNORE_INDEX

ALPHA_THRESHOLD = 0.5  # alpha >= this is part of the object's mask
SOFT_BAND = (0.1, 0.9)  # alpha strictly inside this band is a mixed pixel -> 255 in the semantic PNG


@dataclass
class Layer:
    """One object to paste: ``rgba`` is float32 (h, w, 4), RGB premultiplied by alpha (0..255) and
    alpha in 0..1; (x, y) is its top-left corner on the canvas (may be negative or overflow)."""

    rgba: np.ndarray
    x: int
    y: int
    label: int  # class index 0..C-1
    stamp: str = ""


@dataclass
class PastedObject:
    label: int
    stamp: str
    alpha: np.ndarray  # (H, W) float32, this object's alpha on the canvas
    mask: np.ndarray  # (H, W) bool, alpha >= ALPHA_THRESHOLD
    visible: np.ndarray  # (H, W) bool, mask minus the masks of all later objects
    keep: bool  # annotated (visible part large enough)


@dataclass
class Composite:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    semantic: np.ndarray  # (H, W) uint8: 0 background, 1..C class, 255 ignore
    objects: list[PastedObject]


def composite(
    background: np.ndarray,
    layers: list[Layer],
    min_visible_area: int = 0,
    min_visible_fraction: float = 0.0,
) -> Composite:
    """Paste ``layers`` in order onto ``background`` and derive exact visible masks and labels."""
    height, width = background.shape[:2]
    canvas = background.astype(np.float32)
    alphas = []
    for layer in layers:
        a_full = np.zeros((height, width), np.float32)
        h, w = layer.rgba.shape[:2]
        x0, y0 = max(layer.x, 0), max(layer.y, 0)
        x1, y1 = min(layer.x + w, width), min(layer.y + h, height)
        if x1 > x0 and y1 > y0:
            src = layer.rgba[y0 - layer.y:y1 - layer.y, x0 - layer.x:x1 - layer.x]
            a = src[..., 3]
            a_full[y0:y1, x0:x1] = a
            region = canvas[y0:y1, x0:x1]
            region *= (1.0 - a)[..., None]
            region += src[..., :3]
        alphas.append(a_full)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    objects: list[PastedObject] = [None] * len(layers)  # type: ignore[list-item]
    covered = np.zeros((height, width), bool)
    soft_ignore = np.zeros((height, width), bool)
    for i in reversed(range(len(layers))):
        a = alphas[i]
        mask = a >= ALPHA_THRESHOLD
        visible = mask & ~covered
        soft_ignore |= (a > SOFT_BAND[0]) & (a < SOFT_BAND[1]) & ~covered
        covered |= mask
        n_vis = int(visible.sum())
        keep = n_vis > 0 and n_vis >= min_visible_area and n_vis >= min_visible_fraction * int(mask.sum())
        objects[i] = PastedObject(layers[i].label, layers[i].stamp, a, mask, visible, keep)

    semantic = np.zeros((height, width), np.uint8)
    for obj in objects:
        semantic[obj.visible] = obj.label + 1 if obj.keep else IGNORE_INDEX
    semantic[soft_ignore] = IGNORE_INDEX
    return Composite(image, semantic, objects)


def coco_annotation(obj: PastedObject) -> dict:
    """COCO fields of one visible instance: RLE segmentation, tight bbox, area."""
    rle = mask_utils.encode(np.asfortranarray(obj.visible.astype(np.uint8)))
    bbox = [int(v) for v in mask_utils.toBbox(rle)]
    return {
        "category_id": obj.label + 1,
        "bbox": bbox,
        "area": int(mask_utils.area(rle)),
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "iscrowd": 0,
    }
