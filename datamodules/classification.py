"""Classification data for linear probing and full fine-tuning.

Two sources, both decoded ONCE into an in-memory uint8 tensor (N, 3, S, S) with S = ``data.image_size``:

- an ImageFolder dataset: ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg`` (short side resized
  to S, centre crop);
- otherwise object crops of a COCO-format detection dataset (the embedded one by default, its
  "ImageNet stand-in"): a square window around each non-crowd box (side = ``data.crop_context`` x the
  box's longer side, zero padding outside the image), resized to S; boxes whose longer side is under
  ``data.min_box_size`` pixels are skipped. Train crops come from the train split, val crops from val.

Training augmentation is applied per batch with tensor ops (`random_resized_flip`): a random-resized
crop (area scale ``data.crop_scale``) and horizontal flip through one ``affine_grid`` / ``grid_sample``;
then, when ``data.rand_augment`` names a timm RandAugment policy (e.g. ``rand-m9-mstd0.5-inc1``, ConvNeXt
V2 fine-tuning), timm's ``rand_augment_transform`` on each image (PIL), in timm's order (crop, flip,
RandAugment). Mixup / CutMix and random erasing act on the batch in the LightningModule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from timm.data import rand_augment_transform
from torch.utils.data import DataLoader, Dataset

from common.errors import DataError, UserError
from common.images import IMAGENET_MEAN, to_uint8_image
from datamodules.finetune_common import loader_kwargs, subset_from_config, val_loader
from datamodules.layout import resolve_dataset
from datamodules.readers import IMAGE_SUFFIXES, image_folder, load_coco, read_image
from datamodules.transforms import resize


@dataclass
class ClassificationBatch:
    images: torch.Tensor  # (B, 3, S, S) uint8 RGB, or float in [0, 1] after the training augmentation
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # dataset indices


@dataclass
class ImageCache:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]


def square_crop(image: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """The `side` x `side` window centred on (cx, cy) (zero outside the image), resized to `size`."""
    h, w = image.shape[:2]
    s = max(int(round(side)), 1)
    x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
    out = np.zeros((s, s, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return resize(out, size, size)


def coco_crops(ann_file: Path, image_dir: Path, size: int, context: float, min_box: float,
               images_subset: Callable[[int], np.ndarray] | None = None) -> ImageCache:
    """Object crops of a COCO split (see the module docstring); `images_subset(n)` gives the indices of the
    split's n images (reader order) to crop from, e.g. a labelled subset (``finetune_common.labelled_subset``)."""
    coco = load_coco(ann_file, image_dir)
    crops, labels = [], []
    chosen = coco.images if images_subset is None else [coco.images[int(i)] for i in images_subset(len(coco.images))]
    for im in chosen:
        keep = np.maximum(im.boxes[:, 2], im.boxes[:, 3]) >= min_box
        if not keep.any():
            continue
        pixels = read_image(im.path)
        for (x, y, w, h), label in zip(im.boxes[keep], im.labels[keep]):
            crops.append(square_crop(pixels, x + w / 2, y + h / 2, max(w, h) * context, size))
            labels.append(int(label))
    if not crops:
        raise DataError(f"{ann_file}: no object box of at least {min_box} px to crop for classification")
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return ImageCache(images, torch.tensor(labels, dtype=torch.long), list(coco.class_names))


def folder_images(root: Path, size: int) -> ImageCache:
    """An ImageFolder split decoded once: short side to `size`, centre crop."""
    folder = image_folder(root)
    out = np.empty((len(folder.samples), size, size, 3), np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        img = read_image(path)
        h, w = img.shape[:2]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        img = resize(img, nw, nh)
        y0, x0 = (nh - size) // 2, (nw - size) // 2
        out[i] = img[y0:y0 + size, x0:x0 + size]
    labels = torch.tensor([t for _, t in folder.samples], dtype=torch.long)
    return ImageCache(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels, list(folder.classes))


def is_image_folder(root: Path) -> bool:
    """`root/train` and `root/val` hold class sub-folders of images (and `root` is not a COCO layout)."""
    if (root / "annotations").is_dir():
        return False
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            return False
        sub = [p for p in d.iterdir() if p.is_dir()]
        if not sub or not any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub[0].iterdir()):
            return False
    return True


def random_resized_flip(images: torch.Tensor, scale: tuple[float, float] = (0.35, 1.0),
                        flip_p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched RandomResizedCrop (square, area fraction in `scale`) + horizontal flip, output the input size.

    uint8 (B, 3, S, S) -> float (B, 3, S, S) in [0, 1]. One affine_grid/grid_sample for the batch."""
    b = images.shape[0]
    x = images.float().div_(255) if images.dtype == torch.uint8 else images
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    side = area.sqrt()  # window side as a fraction of the image side
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - side)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - side)
    flip = torch.where(torch.rand(b, generator=generator) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = side * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = side
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class CachedImages(Dataset):
    def __init__(self, cache: ImageCache, indices: np.ndarray | None = None) -> None:
        self.cache = cache
        self.indices = np.arange(len(cache.labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return int(i)  # the collate function gathers the batch with one indexing op


def rand_augment(policy: str, image_size: int) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for `policy` (e.g. ``rand-m9-mstd0.5-inc1``), with timm's fill colour and the
    translation range set for `image_size` as ``timm.data.create_transform`` does."""
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * x) for x in IMAGENET_MEAN)}
    problem = f"data.rand_augment='{policy}' is not a timm RandAugment policy (e.g. rand-m9-mstd0.5-inc1)"
    sections = policy.split("-")
    # timm skips a section without a number silently; here it is an error, like any setting that cannot act
    if sections[0] != "rand" or any(not re.fullmatch(r"[a-z]+\d.*", c) for c in sections[1:]):
        raise UserError(problem)
    try:
        return rand_augment_transform(policy, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{problem}: {exc or 'unknown section'}") from exc


def apply_per_image(transform: Callable[[Image.Image], Image.Image], images: torch.Tensor) -> torch.Tensor:
    """A PIL transform on each image of a float (B, 3, S, S) batch in [0, 1]; returns the same layout."""
    pixels = to_uint8_image(images)  # (B, S, S, 3)
    out = np.stack([np.asarray(transform(Image.fromarray(p))) for p in pixels])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255)


class _Collate:
    """Gathers a batch from the cache by index (one tensor op) and, for training, augments it."""

    def __init__(self, dataset: CachedImages, train: bool, crop_scale: tuple[float, float], flip_p: float,
                 per_image: Callable[[Image.Image], Image.Image] | None = None) -> None:
        self.dataset, self.train, self.crop_scale, self.flip_p = dataset, train, crop_scale, flip_p
        self.per_image = per_image

    def __call__(self, index: list[int]) -> ClassificationBatch:
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = torch.as_tensor(self.dataset.indices, dtype=torch.long)[idx]
        images = self.dataset.cache.images[rows]
        if self.train:
            images = random_resized_flip(images, self.crop_scale, self.flip_p)
            if self.per_image is not None:
                images = apply_per_image(self.per_image, images)
        return ClassificationBatch(images, self.dataset.cache.labels[rows], idx)


class ClassificationDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._cache: dict[str, ImageCache] = {}
        self.train_set: CachedImages | None = None
        self.val_set: CachedImages | None = None
        policy = cfg.data.get("rand_augment")  # built now, so a bad policy is an error before any data is read
        self.rand_augment = rand_augment(str(policy), int(cfg.data.image_size)) if policy else None

    def split(self, name: str) -> ImageCache:
        if name in self._cache:
            return self._cache[name]
        d = self.cfg.data
        size = int(d.image_size)
        root = Path(d.root).expanduser() if d.root is not None else None
        if root is not None and root.is_dir() and is_image_folder(root):
            cache = folder_images(root / name, size)
        else:
            paths = resolve_dataset(d.root, embedded_size=int(d.embedded_size), seed=int(d.embedded_seed))
            ann, images = (paths.train_ann, paths.train_images) if name == "train" else (paths.val_ann, paths.val_images)
            cache = coco_crops(ann, images, size, float(d.crop_context), float(d.min_box_size))
        self._cache[name] = cache
        return cache

    @property
    def class_names(self) -> list[str]:
        return self.split("val").class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            train = self.split("train")
            if train.class_names != self.class_names:
                raise DataError(f"train and val have different classes ({train.class_names} vs {self.class_names})")
            self.train_set = CachedImages(train, subset_from_config(len(train.labels), self.cfg))
        if self.val_set is None:
            self.val_set = CachedImages(self.split("val"))

    def train_dataloader(self) -> DataLoader:
        d = self.cfg.data
        collate = _Collate(self.train_set, True, tuple(d.crop_scale), float(d.flip_p), self.rand_augment)
        bs = int(d.batch_size)
        return DataLoader(self.train_set, batch_size=bs, shuffle=True, drop_last=len(self.train_set) > bs,
                          collate_fn=collate, **loader_kwargs(self.cfg))

    def val_dataloader(self) -> DataLoader:
        return val_loader(self.val_set, int(self.cfg.data.val_batch_size), _Collate(self.val_set, False, (1.0, 1.0), 0.0),
                          self.cfg)

