"""Readers for the datasets users bring: images and label PNGs, COCO instances, ImageFolder (segmentation label
folders: ``datamodules/segmentation_readers.py``).

Everything that can be checked without decoding every image is checked when the dataset is opened,
so a missing file or a malformed annotation stops the run at start-up with a message naming the
file (``DataError``), not in the middle of an epoch. Repairs that keep training meaningful (boxes
clipped to the image, degenerate boxes dropped) are summarised in ONE ``DataWarning`` per file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from common.errors import DataError, DataWarning

if TYPE_CHECKING:
    from pycocotools.coco import COCO

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------ images
def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array: THE image reader of every DataModule.

    Grey, palette, RGBA and CMYK are converted; high bit depths are scaled to 8 bits, not clipped:
    16-bit grey (PIL modes ``I;16``, ``I;16B``, and ``I`` with values in 0..65535) as round(v * 255 / 65535),
    float (``F``) in [0, 1] as round(v * 255); 16-bit colour, which PIL decodes to 8 bits itself, or files
    PIL cannot open at all go through OpenCV (``IMREAD_UNCHANGED``) with the same scaling. A value range
    that cannot be mapped (negative, above 16 bits, float outside [0, 1]) is a ``DataError`` naming the file.

    EXIF orientation is not applied: annotations refer to the stored pixel grid."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # a truncated file fails here, not later
            if im.mode in _HIGH_DEPTH_MODES:
                return _to_rgb8(np.asarray(im), path)
            return np.asarray(im.convert("RGB"))
    except Image.UnidentifiedImageError as exc:
        pixels = _read_with_cv2(path)
        if pixels is None:
            raise DataError(f"{path}: cannot read image ({exc})") from exc
        return pixels
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc


# PIL modes of one channel of more than 8 bits, which convert("RGB") clips to 255 instead of scaling.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    """An HxW or HxWxC (C = 1, 3, 4; RGB order) integer or float array -> HxWx3 uint8 RGB, range scaled."""
    if arr.ndim == 3:
        arr = arr[..., :3] if arr.shape[2] >= 3 else arr[..., 0]
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype.kind == "f":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size and np.isfinite(arr).all() else (np.nan, np.nan)
        if not (lo >= 0.0 and hi <= 1.0):
            raise DataError(f"{path}: float image with values in [{lo:g}, {hi:g}]; expected [0, 1] (or save it as 8/16-bit)")
        out = np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DataError(f"{path}: integer image with values in [{lo}, {hi}]; expected 8 or 16 bits (0..65535)")
        out = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return np.ascontiguousarray(np.repeat(out[..., None], 3, axis=2) if out.ndim == 2 else out)


def _read_with_cv2(path: Path) -> np.ndarray | None:
    """What PIL cannot identify (e.g. some 16-bit colour TIFFs), through OpenCV; None if it cannot either."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., 2::-1]  # BGR(A) -> RGB
    return _to_rgb8(arr, path)


def read_label(path: str | Path) -> np.ndarray:
    """Decode a label PNG to an HxW uint8 array of class indices (palette PNGs give their indices)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label mask not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L"):
                return np.asarray(im).copy()
            if im.mode in ("I", "I;16", "I;16B"):
                arr = np.asarray(im)
                if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
                    raise DataError(f"{path}: label values outside 0..255 (max {arr.max()})")
                return arr.astype(np.uint8)
            raise DataError(f"{path}: expected a single-channel label PNG (class index per pixel), got mode {im.mode}")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read label mask ({exc})") from exc


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image header ({exc})") from exc


# -------------------------------------------------------------------------------------------- COCO
@dataclass
class CocoImage:
    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xywh in pixels, clipped to the image; degenerate boxes dropped
    labels: np.ndarray  # (N,) int64 contiguous 0..C-1
    category_ids: np.ndarray  # (N,) int64 original COCO ids
    ann_ids: np.ndarray  # (N,) int64


@dataclass
class CocoDataset:
    ann_file: Path
    image_dir: Path
    images: list[CocoImage]
    category_ids: list[int]  # sorted; index = contiguous label
    class_names: list[str]
    coco: COCO  # the kept annotations (boxes clipped, degenerate ones dropped, crowd kept as crowd): masks, evaluation

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label_of(self, category_id: int) -> int:
        try:
            return self._label_of[category_id]
        except KeyError:
            raise DataError(f"{self.ann_file}: unknown category id {category_id}") from None

    def __post_init__(self) -> None:
        self._label_of = {cid: i for i, cid in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.images)


def _need(obj: Any, key: str, where: str, ann_file: Path) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{ann_file}: {where} is not an object")
    if key not in obj:
        raise DataError(f"{ann_file}: {where} has no '{key}'")
    return obj[key]


def _int(value: Any, what: str, ann_file: Path) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value != int(value)):
        raise DataError(f"{ann_file}: {what} must be an integer, got {value!r}")
    return int(value)


def _evaluation_annotation(ann: dict[str, Any], box: list[float], crowd: bool, clipped: bool,
                           width: int, height: int) -> dict[str, Any]:
    """The annotation as evaluation sees it: the clipped box, ``iscrowd`` 0/1, and an ``area`` (COCOeval sorts
    objects into small / medium / large by it): the file's own, capped at the box when the box was clipped;
    the mask's pixel count when the file has none, else the box's."""
    out = {**ann, "bbox": box, "iscrowd": int(crowd)}
    area = ann.get("area")
    if isinstance(area, bool) or not isinstance(area, (int, float)) or not math.isfinite(area) or area <= 0:
        area = box[2] * box[3]
        if ann.get("segmentation"):
            from pycocotools import mask as mask_utils

            try:
                seg = ann["segmentation"]
                rle = (mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if isinstance(seg, list)
                       else mask_utils.frPyObjects(seg, height, width) if isinstance(seg.get("counts"), list) else seg)
                area = float(mask_utils.area(rle))
            except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                pass  # an unreadable mask is reported where masks are read; the box area will do here
    elif clipped:
        area = min(float(area), box[2] * box[3])
    out["area"] = float(area)
    return out


def load_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    *,
    keep_crowd: bool = False,
    check_images: bool = True,
) -> CocoDataset:
    """Read a COCO instances JSON. Category ids are mapped to contiguous labels in sorted id order;
    boxes are clipped to the image and degenerate ones dropped (one ``DataWarning`` with the counts);
    images without annotations are kept (negatives); ``iscrowd`` annotations are left out of
    ``images[i].boxes`` unless ``keep_crowd`` (they stay in ``coco`` for evaluation, as crowd regions).

    ``coco`` (pycocotools) holds exactly the annotations the loader kept, with the clipped boxes: the ground
    truth that evaluation scores against, so a box dropped here is not counted as a missed detection there."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{ann_file}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(_need(data, key, "the top level", ann_file), list):
            raise DataError(f"{ann_file}: '{key}' must be a list")
    if not data["categories"]:
        raise DataError(f"{ann_file}: 'categories' is empty")

    names: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        cid = _int(_need(cat, "id", f"categories[{i}]", ann_file), f"categories[{i}].id", ann_file)
        if cid in names:
            raise DataError(f"{ann_file}: category id {cid} appears twice")
        names[cid] = str(_need(cat, "name", f"categories[{i}]", ann_file))
    category_ids = sorted(names)
    label_of = {cid: k for k, cid in enumerate(category_ids)}

    metas: dict[int, tuple[str, int, int]] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        iid = _int(_need(img, "id", where, ann_file), f"{where}.id", ann_file)
        if iid in metas:
            raise DataError(f"{ann_file}: image id {iid} appears twice")
        file_name = _need(img, "file_name", where, ann_file)
        w = _int(_need(img, "width", where, ann_file), f"{where}.width", ann_file)
        h = _int(_need(img, "height", where, ann_file), f"{where}.height", ann_file)
        if w <= 0 or h <= 0:
            raise DataError(f"{ann_file}: {where} ({file_name}) has size {w}x{h}")
        metas[iid] = (str(file_name), w, h)

    per_image: dict[int, list[tuple[list[float], int, int]]] = {iid: [] for iid in metas}
    kept: list[dict[str, Any]] = []  # what evaluation scores against: every box the loader keeps, crowd included
    seen_ann: set[int] = set()
    n_clipped = n_dropped = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        aid = _int(_need(ann, "id", where, ann_file), f"{where}.id", ann_file)
        if aid in seen_ann:
            raise DataError(f"{ann_file}: annotation id {aid} appears twice")
        seen_ann.add(aid)
        iid = _int(_need(ann, "image_id", where, ann_file), f"{where}.image_id", ann_file)
        cid = _int(_need(ann, "category_id", where, ann_file), f"{where}.category_id", ann_file)
        if iid not in metas:
            raise DataError(f"{ann_file}: {where} (id {aid}) refers to unknown image id {iid}")
        if cid not in label_of:
            raise DataError(f"{ann_file}: {where} (id {aid}) refers to unknown category id {cid}")
        bbox = _need(ann, "bbox", where, ann_file)
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DataError(f"{ann_file}: {where} (id {aid}) bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        _, width, height = metas[iid]
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            n_dropped += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(width)), min(y + h, float(height))
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            n_dropped += 1
            continue
        clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
        n_clipped += clipped
        box = [x0, y0, x1 - x0, y1 - y0]
        crowd = bool(ann.get("iscrowd", 0))
        kept.append(_evaluation_annotation(ann, box, crowd, clipped, width, height))
        if crowd and not keep_crowd:
            continue
        per_image[iid].append((box, cid, aid))

    images = []
    for iid, (file_name, width, height) in metas.items():
        anns = per_image[iid]
        cids = np.array([a[1] for a in anns], np.int64)
        images.append(CocoImage(
            id=iid,
            path=image_dir / file_name,
            width=width,
            height=height,
            boxes=np.array([a[0] for a in anns], np.float32).reshape(-1, 4),
            labels=np.array([label_of[c] for c in cids], np.int64),
            category_ids=cids,
            ann_ids=np.array([a[2] for a in anns], np.int64),
        ))
    if check_images:
        missing = [im.path for im in images if not im.path.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(images)} images listed in {ann_file} are missing from {image_dir}, "
                f"e.g. {missing[0]}"
            )
    if n_clipped or n_dropped:
        warnings.warn(
            f"{ann_file}: clipped {n_clipped} boxes, dropped {n_dropped} degenerate boxes",
            DataWarning, stacklevel=2,
        )

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {**data, "annotations": kept}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return CocoDataset(ann_file, image_dir, images, category_ids, [names[c] for c in category_ids], coco)


# ---------------------------------------------------------------------------------- ImageFolder
def _checked_pil_loader(path: str) -> Image.Image:
    """ImageFolder's loader, through ``read_image`` (one reader: 16-bit scaled, errors naming the file)."""
    return Image.fromarray(read_image(path))


def image_folder(root: str | Path, transform: Callable | None = None, **kwargs: Any):
    """torchvision ``ImageFolder`` (one sub-folder per class) with clear errors: a missing or empty
    folder raises ``DataError`` naming it; a corrupt image raises ``DataError`` naming the file when read."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class name>/<image files>)")
    try:
        return ImageFolder(str(root), transform=transform, loader=_checked_pil_loader, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"{root}: no images in its class sub-folders ({exc})") from exc
