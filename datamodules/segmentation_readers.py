"""Readers of semantic-segmentation datasets: image + label-PNG pairs in the project, VOC or Cityscapes layout.

As ``datamodules/readers.py``: what can be checked without decoding every image is checked when the dataset is
opened (missing or unpaired files, sizes from the headers), with a ``DataError`` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError
from datamodules.readers import IGNORE_INDEX, IMAGE_SUFFIXES, image_size, read_image, read_label

# ---------------------------------------------------------------------------------- segmentation
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
# Cityscapes labelId -> trainId (the 19 evaluated classes); every other id is ignored (255).
_CITYSCAPES_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)
for _label_id, _train_id in _CITYSCAPES_TRAIN_ID.items():
    CITYSCAPES_LUT[_label_id] = _train_id


def _voc_root(root: Path) -> Path | None:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return None


def segmentation_layout(root: str | Path) -> str:
    """'voc', 'cityscapes' or 'project' (``images/<split>`` + ``masks/<split>``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation dataset folder not found: {root}")
    if _voc_root(root) is not None:
        return "voc"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "project"
    found = sorted(p.name for p in root.iterdir())[:20]
    raise DataError(
        f"{root}: not a segmentation dataset; expected one of: VOC (JPEGImages/, SegmentationClass/, "
        f"ImageSets/Segmentation/<split>.txt), Cityscapes (leftImg8bit/<split>/<city>/, gtFine/<split>/<city>/), "
        f"or images/<split>/ + masks/<split>/; found {found}"
    )


def _with_mask(img: Path, mask: Path) -> tuple[Path, Path]:
    if not mask.is_file():
        raise DataError(f"no mask for image {img}: expected {mask}")
    return img, mask


def _pair_by_stem(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    if not images_dir.is_dir():
        raise DataError(f"image folder not found: {images_dir}")
    if not masks_dir.is_dir():
        raise DataError(f"mask folder not found: {masks_dir}")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    return [_with_mask(img, masks_dir / f"{img.stem}.png") for img in images]


def find_segmentation_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label PNG) pairs of ``split`` for a VOC, Cityscapes or project-layout folder."""
    root = Path(root)
    layout = segmentation_layout(root)
    if layout == "project":
        return _pair_by_stem(root / "images" / split, root / "masks" / split)
    if layout == "voc":
        voc = _voc_root(root)
        assert voc is not None
        list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"VOC split list not found: {list_file}")
        stems = [s.strip().split()[0] for s in list_file.read_text().splitlines() if s.strip()]
        if not stems:
            raise DataError(f"{list_file} lists no images")
        pairs = []
        for stem in stems:
            img, mask = voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClass" / f"{stem}.png"
            if not img.is_file():
                raise DataError(f"image {img} listed in {list_file} not found")
            pairs.append(_with_mask(img, mask))
        return pairs
    # cityscapes
    split_dir = root / "leftImg8bit" / split
    if not split_dir.is_dir():
        raise DataError(f"Cityscapes split folder not found: {split_dir}")
    images = sorted(split_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"no */*_leftImg8bit.png images in {split_dir}")
    return [_with_mask(img, root / "gtFine" / split / img.parent.name
                       / f"{img.name.removesuffix('_leftImg8bit.png')}_gtFine_labelIds.png") for img in images]


def segmentation_class_names(root: str | Path) -> list[str] | None:
    """Class names indexed by label value. VOC and Cityscapes: their own. Any other folder (project layout,
    a dataset YAML's folder): ``classes.txt`` (one name per line) if present, else ``background`` + the
    categories of ``annotations/instances_*.json`` when their ids are 1..C (as in the embedded dataset);
    None when neither tells. A file that is there but cannot be read (a truncated JSON, categories
    without ids) is a ``DataError`` naming it, not "unknown classes"."""
    root = Path(root)
    if _voc_root(root) is not None:
        return list(VOC_CLASSES)
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return list(CITYSCAPES_CLASSES)
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        try:
            return [s.strip() for s in classes_txt.read_text().splitlines() if s.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{classes_txt}: cannot read class names ({exc})") from exc
    for ann in sorted((root / "annotations").glob("instances_*.json")):
        try:
            cats = json.loads(ann.read_text())["categories"]
            ids = sorted(int(c["id"]) for c in cats)
            by_id = {int(c["id"]): str(c["name"]) for c in cats}
        except json.JSONDecodeError as exc:
            raise DataError(f"{ann}: not valid JSON ({exc}); it names the segmentation classes "
                            f"(or add {classes_txt}, one name per line)") from exc
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{ann}: cannot read its categories ({type(exc).__name__}: {exc}); they name the "
                            f"segmentation classes (or add {classes_txt}, one name per line)") from exc
        if ids == list(range(1, len(ids) + 1)):
            return ["background"] + [by_id[i] for i in ids]
    return None


class SegmentationFolder:
    """Image + label-PNG pairs; ``dataset[i]`` is ``(image HxWx3 uint8 RGB, label HxW uint8)`` with 255 =
    ignore, or ``transform(image, label)`` when a transform is given.

    Build it from two folders paired by file stem (``SegmentationFolder(images_dir, masks_dir)``) or
    from a dataset root in VOC / Cityscapes / project layout (``SegmentationFolder.from_root(root,
    split)``). Every pair's sizes are compared from the file headers up front."""

    def __init__(
        self,
        images_dir: str | Path | None = None,
        masks_dir: str | Path | None = None,
        *,
        pairs: Sequence[tuple[Path, Path]] | None = None,
        class_names: Sequence[str] | None = None,
        label_lut: np.ndarray | None = None,
    ) -> None:
        if pairs is None:
            if images_dir is None or masks_dir is None:
                raise TypeError("give images_dir and masks_dir, or pairs")
            pairs = _pair_by_stem(Path(images_dir), Path(masks_dir))
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        if not self.pairs:
            raise DataError(f"no image/mask pairs in {images_dir}")
        self.class_names = list(class_names) if class_names is not None else None
        self.label_lut = label_lut
        for img, mask in self.pairs:  # sizes from the file headers, up front
            try:
                sizes = image_size(img), image_size(mask)
            except DataError:
                continue  # a file that does not open is data.bad_images' to report or skip (image_check)
            self._check_size(img, mask, *sizes)

    @classmethod
    def from_root(cls, root: str | Path, split: str, **kwargs: Any) -> SegmentationFolder:
        layout = segmentation_layout(root)
        kwargs.setdefault("label_lut", CITYSCAPES_LUT if layout == "cityscapes" else None)
        if "class_names" not in kwargs:
            kwargs["class_names"] = segmentation_class_names(root)
        return cls(pairs=find_segmentation_pairs(root, split), **kwargs)

    @staticmethod
    def _check_size(img: Path, mask: Path, img_wh: tuple[int, int], mask_wh: tuple[int, int]) -> None:
        if tuple(img_wh) != tuple(mask_wh):
            raise DataError(
                f"mask {mask} is {mask_wh[0]}x{mask_wh[1]} but its image {img} is {img_wh[0]}x{img_wh[1]}"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, mask_path = self.pairs[index]
        image, label = read_image(img_path), read_label(mask_path)
        self._check_size(img_path, mask_path, image.shape[1::-1], label.shape[1::-1])
        if self.label_lut is not None:
            label = self.label_lut[label]
        return image, label

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.load(index)
