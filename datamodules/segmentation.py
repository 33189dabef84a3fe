"""Semantic segmentation data for fine-tuning: image + label-PNG folders (project layout ``images/<split>``
+ ``masks/<split>``, VOC or Cityscapes; the embedded dataset by default), 0..K-1 class per pixel,
255 = ignore.

Training (DeepLab / mmseg recipe, sizes in ``data.*``): resize so the short side is ``base_size``
times a random scale in ``scale_range``, random ``crop_size`` crop (padded with label 255 where the
image is smaller), horizontal flip. Validation: the whole image, short side resized to ``val_size``
(null = stored size; the label is resized with nearest neighbour), batched by padding with label 255.
``--label-fraction`` / ``--label-count`` train on a nested, deterministic subset of the labelled images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, RandomSampler

from common.errors import DataError
from datamodules.finetune_common import loader_kwargs, subset_from_config, val_loader
from datamodules.image_check import check_images
from datamodules.layout import resolve_dataset
from datamodules.readers import IGNORE_INDEX
from datamodules.segmentation_readers import (
    SegmentationFolder,
    segmentation_class_names,
    segmentation_layout,
)


@dataclass
class SegmentationBatch:
    images: torch.Tensor  # (B, 3, H, W) uint8 RGB (normalised on the device by the module)
    labels: torch.Tensor  # (B, H, W) int64, 255 = ignore (also the padding)
    index: torch.Tensor  # dataset indices


def resize_pair(image: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale an image (area / bilinear) and its label map (nearest neighbour) by `scale`."""
    h, w = label.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return image, label
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return (cv2.resize(image, (nw, nh), interpolation=interp),
            cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST))


class SegmentationData(Dataset):
    """`folder` pairs at `indices`, with the training augmentation or the validation resize."""

    def __init__(self, folder: SegmentationFolder, indices: np.ndarray | None, num_classes: int, *, train: bool,
                 crop_size: int = 512, base_size: int = 512, scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_p: float = 0.5, val_size: int | None = None) -> None:
        self.folder = folder
        self.indices = np.arange(len(folder)) if indices is None else np.asarray(indices)
        self.num_classes = num_classes
        self.train = train
        self.crop_size = int(crop_size)
        self.base_size = int(base_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_p = float(flip_p)
        self.val_size = None if val_size is None else int(val_size)

    def __len__(self) -> int:
        return len(self.indices)

    def _check(self, label: np.ndarray, k: int) -> None:
        valid = label[label != IGNORE_INDEX]
        if valid.size and int(valid.max()) >= self.num_classes:
            raise DataError(f"{self.folder.pairs[k][1]}: label value {int(valid.max())} but the dataset has "
                            f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore)")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = int(self.indices[i])
        image, label = self.folder.load(k)
        self._check(label, k)
        if self.train:
            image, label = self._augment(image, label)
        elif self.val_size is not None:
            image, label = resize_pair(image, label, self.val_size / min(label.shape))
        return (torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1),  # copies: read-only decode
                torch.from_numpy(np.ascontiguousarray(label)).long(), i)

    def _augment(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()))
        image, label = resize_pair(image, label, self.base_size * scale / min(label.shape))
        c = self.crop_size
        h, w = label.shape
        ph, pw = max(c - h, 0), max(c - w, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
            h, w = label.shape
        y0 = int(torch.randint(0, h - c + 1, ()))
        x0 = int(torch.randint(0, w - c + 1, ()))
        image, label = image[y0:y0 + c, x0:x0 + c], label[y0:y0 + c, x0:x0 + c]
        if self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            image, label = image[:, ::-1], label[:, ::-1]
        return image, label


def collate_segmentation(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> SegmentationBatch:
    """Stack, padding to the largest size in the batch (image with 0, label with 255 = ignored)."""
    images, labels, index = zip(*samples)
    h = max(t.shape[-2] for t in labels)
    w = max(t.shape[-1] for t in labels)
    images = torch.stack([F.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2])) for im in images])
    labels = torch.stack([F.pad(lb, (0, w - lb.shape[-1], 0, h - lb.shape[-2]), value=IGNORE_INDEX) for lb in labels])
    return SegmentationBatch(images, labels, torch.tensor(index))


class SegmentationDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._folders: dict[str, SegmentationFolder] = {}
        self.train_set: SegmentationData | None = None
        self.val_set: SegmentationData | None = None

    def folder(self, split: str) -> SegmentationFolder:
        """The (image, label) pairs of `split` (read once)."""
        if split in self._folders:
            return self._folders[split]
        d = self.cfg.data
        root = Path(d.root).expanduser() if d.root is not None else None
        layout = None
        if root is not None and root.is_dir():
            try:
                layout = segmentation_layout(root)
            except DataError:
                layout = None
        if layout is not None:
            folder = SegmentationFolder.from_root(root, split)
        else:
            paths = resolve_dataset(d.root, embedded_size=int(d.embedded_size), seed=int(d.embedded_seed))
            masks = paths.train_masks if split == "train" else paths.val_masks
            images = paths.train_images if split == "train" else paths.val_images
            if masks is None:
                raise DataError(f"{paths.root}: no semantic label PNGs for '{split}' (expected masks/{split}/ "
                                "or train_masks/val_masks in the dataset YAML)")
            folder = SegmentationFolder(images, masks, class_names=segmentation_class_names(paths.root))
        self._folders[split] = folder
        return folder

    @property
    def class_names(self) -> list[str]:
        names = self.folder("val").class_names
        n = self.cfg.model.get("num_classes")
        if names is None:
            if n is None:
                raise DataError("cannot tell the segmentation classes: add classes.txt (one name per line, line k = "
                                "label k) to the dataset folder, or set model.num_classes")
            return [f"class{k}" for k in range(int(n))]
        return list(names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def readable(self, split: str, indices: np.ndarray) -> np.ndarray:
        """`indices` of the pairs whose image and label PNG both decode (``data.bad_images``: an unreadable
        file is an error, or its pair is left out with one warning); checks cached (``datamodules.image_check``)."""
        pairs = [self.folder(split).pairs[i] for i in indices]
        bad = check_images([p for pair in pairs for p in pair], policy=str(self.cfg.data.bad_images),
                           what=f"the {split} split", cache_dir=self.cfg.data.get("cache_dir"))
        keep = np.array([i for i, (img, mask) in zip(indices, pairs) if img not in bad and mask not in bad], np.int64)
        if len(keep) == 0:
            raise DataError(f"no readable image/label pair in the {split} split")
        return keep

    def prepare_data(self) -> None:
        """Decode the files once on local rank 0, so that every rank's ``setup`` finds the checks cached."""
        if self.trainer is None or self.trainer.state.fn == "fit":
            self.readable("train", subset_from_config(len(self.folder("train")), self.cfg))
        self.readable("val", np.arange(len(self.folder("val"))))

    def setup(self, stage: str | None = None) -> None:
        d = self.cfg.data
        k = self.num_classes
        if stage in ("fit", None) and self.train_set is None:
            train = self.folder("train")
            self.train_set = SegmentationData(
                train, self.readable("train", subset_from_config(len(train), self.cfg)), k, train=True,
                crop_size=int(d.crop_size), base_size=int(d.base_size), scale_range=tuple(d.scale_range),
                flip_p=float(d.flip_p))
        if self.val_set is None:
            val = self.folder("val")
            self.val_set = SegmentationData(val, self.readable("val", np.arange(len(val))), k, train=False,
                                            val_size=None if d.val_size is None else int(d.val_size))

    def train_dataloader(self) -> DataLoader:
        # Full batches only: the ASPP image-pooling branch has BatchNorm over a 1x1 map, which needs more
        # than one sample. A labelled subset smaller than a batch is drawn with replacement.
        bs = int(self.cfg.data.batch_size)
        n = len(self.train_set)
        sampler = RandomSampler(self.train_set, replacement=n < bs, num_samples=max(n, bs))
        return DataLoader(self.train_set, batch_size=bs, sampler=sampler, drop_last=True,
                          collate_fn=collate_segmentation, **loader_kwargs(self.cfg))

    def val_dataloader(self) -> DataLoader:
        return val_loader(self.val_set, int(self.cfg.data.val_batch_size), collate_segmentation, self.cfg)
