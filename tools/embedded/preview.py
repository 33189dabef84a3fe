"""A picture of a built embedded dataset: images with boxes and class names, instance masks, semantic labels
(``python -m tools.embedded --preview FILE.png``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import cv2
import numpy as np

from common.errors import DataError
from common.images import PREVIEW_PALETTE, colorize_labels
from datamodules.readers import IGNORE_INDEX, read_image
from tools.embedded.sources import CLASSES


def write_preview(root: str | Path, out_png: str | Path, split: str = "train", count: int = 8,
                  columns: int = 2) -> Path:
    """Grid of ``count`` images of ``split``, read back from the written files. Each row shows the photo
    with boxes and class names, its instance masks (one colour per instance on the greyed photo) and
    its semantic label PNG (colour per class, white = 255 ignore)."""
    from pycocotools.coco import COCO

    root = Path(root)
    with contextlib.redirect_stdout(None):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    tiles = []
    for img_id in sorted(coco.getImgIds())[:count]:
        info = coco.loadImgs(img_id)[0]
        img = read_image(root / "images" / split / info["file_name"])
        sem = cv2.imread(str(root / "masks" / split / (Path(info["file_name"]).stem + ".png")), cv2.IMREAD_UNCHANGED)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        boxes = img.copy()
        masks = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] // 2, 3, axis=2)
        for k, ann in enumerate(anns):
            colour = PREVIEW_PALETTE[k % len(PREVIEW_PALETTE)]
            masks[coco.annToMask(ann).astype(bool)] = colour
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            c = tuple(int(v) for v in colour)
            cv2.rectangle(boxes, (x, y), (x + w - 1, y + h - 1), c, 1)
            cv2.rectangle(masks, (x, y), (x + w - 1, y + h - 1), c, 1)
            label = names[ann["category_id"]]
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            ty = max(y, th + 2)
            cv2.rectangle(boxes, (x, ty - th - 2), (x + tw + 2, ty), c, -1)
            cv2.putText(boxes, label, (x + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        gap = np.full((img.shape[0], 3, 3), 255, np.uint8)
        row = np.hstack([boxes, gap, masks, gap, colorize_labels(sem, len(CLASSES), IGNORE_INDEX)])
        tiles.append(np.pad(row, ((4, 4), (6, 6), (0, 0))))
    if not tiles:
        raise DataError(f"{root}: no images in split {split!r} to preview")
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out_png
