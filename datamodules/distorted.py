"""Distorted batches for label-based pixel contrastive pre-training (Zhao et al., ICCV 2021): image I,
its distorted copy I^ and the label map, from segmentation data (the embedded dataset's semantic masks,
or VOC / Cityscapes / project-layout folders via ``--data``).

Geometry is shared: each item is the fine-tuning training crop of ``datamodules.segmentation``
(random scale ``scale_range`` x ``base_size`` short side, ``crop_size`` crop padded with label 255,
horizontal flip), so the label map follows it; I^ then differs from I only photometrically (colour
jitter in random order with probability ``jitter_p``, grey-scale with ``grayscale_p``, Gaussian blur
with ``blur_p``), so the pixel labels stay aligned.

The training images are the labelled subset of fine-tuning (``data.label_fraction`` /
``data.label_count`` / ``data.subset_seed`` through ``datamodules.finetune_common.subset_from_config``):
pre-training and fine-tuning with the same settings see the same labelled images. Images are uint8;
the LightningModule normalises them on the device (as fine-tuning does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from common.errors import UserError
from common.images import overlay_labels
from datamodules.finetune_common import loader_kwargs, subset_from_config
from datamodules.segmentation import SegmentationData, SegmentationDataModule


@dataclass
class DistortedBatch:
    images: torch.Tensor  # (B, 3, H, W) uint8 RGB: image I
    distorted: torch.Tensor  # (B, 3, H, W) uint8 RGB: I^, a photometric distortion of I (same geometry)
    labels: torch.Tensor  # (B, H, W) int64 class per pixel of both, 255 = ignore (also the crop padding)
    index: torch.Tensor  # (B,) dataset indices (into the labelled subset)


@dataclass(frozen=True)
class Distortion:
    """Photometric distortion strengths (SimCLR-style colour distortion; 0 disables a part)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise UserError(f"data.distortion.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise UserError(f"data.distortion.hue must be in [0, 0.5], got {self.hue}")
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"data.distortion.{name} must be a probability, got {getattr(self, name)}")

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(3, H, W) uint8 -> distorted (3, H, W) uint8. Random draws from `generator` (or torch's global RNG,
        which Lightning seeds per worker)."""

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        out = image
        if u(0, 1) < self.jitter_p:
            for op in torch.randperm(4, generator=generator).tolist():
                if op == 0 and self.brightness > 0:
                    out = TF.adjust_brightness(out, u(max(0.0, 1 - self.brightness), 1 + self.brightness))
                elif op == 1 and self.contrast > 0:
                    out = TF.adjust_contrast(out, u(max(0.0, 1 - self.contrast), 1 + self.contrast))
                elif op == 2 and self.saturation > 0:
                    out = TF.adjust_saturation(out, u(max(0.0, 1 - self.saturation), 1 + self.saturation))
                elif op == 3 and self.hue > 0:
                    out = TF.adjust_hue(out, u(-self.hue, self.hue))
        if u(0, 1) < self.grayscale_p:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if u(0, 1) < self.blur_p:
            sigma = u(*self.blur_sigma)
            k = max(3, int(2 * round(3 * sigma) + 1))
            out = TF.gaussian_blur(out, [k, k], [sigma, sigma])
        return out

    @classmethod
    def from_config(cls, d: DictConfig) -> Distortion:
        return cls(brightness=float(d.brightness), contrast=float(d.contrast), saturation=float(d.saturation),
                   hue=float(d.hue), jitter_p=float(d.jitter_p), grayscale_p=float(d.grayscale_p),
                   blur_p=float(d.blur_p), blur_sigma=(float(d.blur_sigma[0]), float(d.blur_sigma[1])))


class DistortedData(Dataset):
    """(image, distorted image, label, index) from a fine-tuning training dataset (shared geometry)."""

    def __init__(self, base: SegmentationData, distortion: Distortion) -> None:
        self.base, self.distortion = base, distortion

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        image, label, index = self.base[i]
        return image, self.distortion(image), label, index


def collate_distorted(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> DistortedBatch:
    images, distorted, labels, index = zip(*items)
    return DistortedBatch(torch.stack(images), torch.stack(distorted), torch.stack(labels), torch.tensor(index))


class DistortedDataModule(L.LightningDataModule):
    """Training batches of ``DistortedBatch`` (no validation: pre-training). Folder resolution and class
    names come from the fine-tuning ``SegmentationDataModule`` (same keys: data.root, data.embedded_size,
    data.embedded_seed, model.num_classes)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.segmentation = SegmentationDataModule(cfg)
        self.distortion = Distortion.from_config(cfg.data.distortion)
        self.train_set: DistortedData | None = None

    @property
    def num_classes(self) -> int:
        return self.segmentation.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.segmentation.class_names

    def prepare_data(self) -> None:
        self.segmentation.folder("train")  # builds the embedded dataset on first use

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        d = self.cfg.data
        train = self.segmentation.folder("train")
        indices = subset_from_config(len(train), self.cfg)
        base = SegmentationData(train, indices, self.num_classes, train=True, crop_size=int(d.crop_size),
                                base_size=int(d.base_size), scale_range=tuple(d.scale_range), flip_p=float(d.flip_p))
        self.train_set = DistortedData(base, self.distortion)

    def train_dataloader(self) -> DataLoader:
        # Full batches (ASPP's image-pooling BatchNorm needs > 1 sample; the cross-image partner needs > 1
        # image); a labelled subset smaller than a batch is drawn with replacement.
        self.setup()
        bs = int(self.cfg.data.batch_size)
        n = len(self.train_set)
        sampler = RandomSampler(self.train_set, replacement=n < bs, num_samples=max(n, bs))
        return DataLoader(self.train_set, batch_size=bs, sampler=sampler, drop_last=True,
                          collate_fn=collate_distorted, **loader_kwargs(self.cfg))

    def write_preview(self, out_dir: str | Path, n: int = 8) -> list[Path]:
        """``n`` items as PNG: image | distorted | labels (class colours over the image)."""
        self.setup()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(min(n, len(self.train_set))):
            image, distorted, label, _ = self.train_set[k]
            rgb = image.permute(1, 2, 0).numpy()
            panel = np.concatenate([rgb, distorted.permute(1, 2, 0).numpy(),
                                    overlay_labels(rgb, label.numpy(), self.num_classes)], axis=1)
            path = out / f"distorted_{k:04d}.png"
            Image.fromarray(np.ascontiguousarray(panel)).save(path)
            paths.append(path)
        return paths
