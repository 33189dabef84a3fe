"""COCO-format detection / instance segmentation data for fine-tuning (any COCO dataset; the embedded one
by default).

Images go to the model at their stored size as float tensors in [0, 1]; the detector's own transform
(torchvision ``GeneralizedRCNNTransform``) resizes them (multi-scale in training, one size at test) and
normalises them, and maps its predictions back to the stored pixel grid, which is the grid of the
annotations, so evaluation needs no rescaling. Training: horizontal flip (p = ``data.flip_p``),
``iscrowd`` boxes left out, images without boxes skipped (Detectron's default), optional labelled subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from common.errors import DataError
from datamodules.finetune_common import loader_kwargs, subset_from_config, val_loader
from datamodules.image_check import check_images
from datamodules.layout import DatasetPaths, resolve_dataset
from datamodules.readers import CocoDataset, load_coco, read_image


@dataclass
class DetectionBatch:
    """A batch of variable-size images and their targets, in torchvision's detection format."""

    images: list[torch.Tensor]  # (3, H, W) float32 in [0, 1]
    targets: list[dict[str, torch.Tensor]]  # boxes (N, 4) x0 y0 x1 y1, labels (N,) 0..C-1, masks (N, H, W) uint8
    image_ids: list[int]  # COCO image ids
    index: torch.Tensor  # dataset indices


class CocoDetection(Dataset):
    """`coco.images[indices[i]]` as (image tensor, target dict, image id, index)."""

    def __init__(self, coco: CocoDataset, indices: np.ndarray | None = None, *, train: bool = False,
                 flip_p: float = 0.0, with_masks: bool = False) -> None:
        self.coco = coco
        self.indices = np.arange(len(coco.images)) if indices is None else np.asarray(indices)
        self.train = train
        self.flip_p = float(flip_p)
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.indices)

    def masks_of(self, k: int) -> np.ndarray:
        """(N, H, W) uint8 instance masks of image `k` (order of its boxes), decoded in one call."""
        im = self.coco.images[k]
        if len(im.ann_ids) == 0:
            return np.zeros((0, im.height, im.width), np.uint8)
        anns = self.coco.coco.loadAnns(im.ann_ids.tolist())
        for ann in anns:
            if not ann.get("segmentation"):
                raise DataError(f"{self.coco.ann_file}: annotation {ann['id']} has no 'segmentation' (Mask R-CNN needs masks)")
        rles = [self.coco.coco.annToRLE(a) for a in anns]
        return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
        k = int(self.indices[i])
        im = self.coco.images[k]
        pixels = read_image(im.path)
        if pixels.shape[:2] != (im.height, im.width):
            raise DataError(f"{im.path}: image is {pixels.shape[1]}x{pixels.shape[0]} but "
                            f"{self.coco.ann_file.name} says {im.width}x{im.height}")
        boxes = torch.from_numpy(im.boxes.copy())
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {"boxes": boxes, "labels": torch.from_numpy(im.labels.copy())}
        masks = self.masks_of(k) if self.with_masks else None
        if self.train and self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            pixels = pixels[:, ::-1]
            boxes[:, [0, 2]] = im.width - boxes[:, [2, 0]]
            masks = masks[:, :, ::-1] if masks is not None else None
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        image = torch.tensor(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255)  # copies: read-only decode
        return image, target, im.id, int(i)


def collate_detection(samples: list[tuple[torch.Tensor, dict[str, torch.Tensor], int, int]]) -> DetectionBatch:
    images, targets, ids, index = zip(*samples)
    return DetectionBatch(list(images), list(targets), list(ids), torch.tensor(index))


class DetectionDataModule(L.LightningDataModule):
    """Train / val splits of a COCO-format dataset (``data.root``; None = the embedded dataset)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._paths: DatasetPaths | None = None
        self.train_coco: CocoDataset | None = None
        self.val_coco: CocoDataset | None = None
        self.train_set: CocoDetection | None = None
        self.val_set: CocoDetection | None = None

    @property
    def with_masks(self) -> bool:
        return str(self.cfg.model.detector) == "mask_rcnn"

    @property
    def paths(self) -> DatasetPaths:
        if self._paths is None:
            d = self.cfg.data
            self._paths = resolve_dataset(d.root, embedded_size=int(d.embedded_size), seed=int(d.embedded_seed))
        return self._paths

    def load(self, train: bool = True) -> None:
        """Read the annotation files (once). `train=False` reads only the val split (evaluation)."""
        if self.val_coco is None:
            self.val_coco = load_coco(self.paths.val_ann, self.paths.val_images)
        if train and self.train_coco is None:
            self.train_coco = load_coco(self.paths.train_ann, self.paths.train_images)
            if self.train_coco.category_ids != self.val_coco.category_ids:
                raise DataError(f"{self.paths.train_ann} and {self.paths.val_ann} list different categories "
                                f"({self.train_coco.category_ids} vs {self.val_coco.category_ids})")

    @property
    def num_classes(self) -> int:
        self.load(train=False)
        return self.val_coco.num_classes

    @property
    def class_names(self) -> list[str]:
        self.load(train=False)
        return list(self.val_coco.class_names)

    def train_indices(self) -> np.ndarray:
        """Labelled subset of the training images (see `labelled_subset`), then images without boxes dropped."""
        self.load(train=True)
        images = self.train_coco.images
        chosen = subset_from_config(len(images), self.cfg)
        if self.cfg.data.skip_empty_train:
            chosen = np.array([i for i in chosen if len(images[i].boxes)], dtype=np.int64)
        if len(chosen) == 0:
            raise DataError(f"{self.paths.train_ann}: no training image with a box in the chosen subset")
        return chosen

    def readable(self, coco: CocoDataset, indices: np.ndarray, split: str) -> np.ndarray:
        """`indices` of images that decode (``data.bad_images``: an unreadable one is an error, or is left
        out with one warning); decoded once per file, then cached (``datamodules.image_check``)."""
        paths = [coco.images[i].path for i in indices]
        bad = check_images(paths, policy=str(self.cfg.data.bad_images), what=f"{coco.ann_file} ({split})",
                           cache_dir=self.cfg.data.get("cache_dir"))
        keep = np.array([i for i, p in zip(indices, paths) if Path(p) not in bad], dtype=np.int64)
        if len(keep) == 0:
            raise DataError(f"{coco.ann_file}: no readable {split} image" + (" with a box" if split == "train" else ""))
        return keep

    def prepare_data(self) -> None:
        """Decode the images once on local rank 0, so that every rank's ``setup`` finds the checks cached."""
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        if fitting:
            indices = self.train_indices()  # reads the annotations
            self.readable(self.train_coco, indices, "train")
        self.load(train=False)
        self.readable(self.val_coco, np.arange(len(self.val_coco.images)), "val")

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            indices = self.train_indices()  # reads the annotations
            indices = self.readable(self.train_coco, indices, "train")
            self.train_set = CocoDetection(self.train_coco, indices, train=True, flip_p=float(self.cfg.data.flip_p),
                                           with_masks=self.with_masks)
        if self.val_set is None:
            self.load(train=False)
            self.val_set = CocoDetection(self.val_coco, self.readable(self.val_coco, np.arange(len(self.val_coco.images)),
                                                                      "val"))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=int(self.cfg.data.batch_size), shuffle=True, drop_last=False,
                          collate_fn=collate_detection, **loader_kwargs(self.cfg))

    def val_dataloader(self) -> DataLoader:
        return val_loader(self.val_set, int(self.cfg.data.val_batch_size), collate_detection, self.cfg)
