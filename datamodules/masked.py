"""Masked-image batches for FCMAE pre-training (ConvNeXt V2, Woo et al. 2023; official main_pretrain.py).

Per image: RandomResizedCrop(image_size, scale=(0.2, 1), ratio=(3/4, 4/3), bicubic) + horizontal flip
(p=0.5), ImageNet normalisation, and a random patch mask on the (image_size / patch_size)^2 grid with
exactly ``models.fcmae.num_masked(L, mask_ratio)`` masked patches (1 = masked). ``patch_size`` must be a
multiple of the encoder's total stride (32 for every ConvNeXt V2) and divide ``image_size``: checked
up front with a clear error.

Determinism: the sampler yields *draw keys* ``epoch * len(dataset) + index`` (a shuffled, rank-sharded
permutation per epoch); the dataset item for key k is image ``k % n`` augmented and masked with
``numpy.random.default_rng([seed, k])`` -- the same for any number of workers, and new every epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms.v2 import RandomResizedCrop

from common.errors import UserError
from common.images import normalize_uint8  # LUT-based uint8 -> normalised float (shared)
from datamodules.readers import IMAGE_SUFFIXES, read_image
from models.fcmae import num_masked

CONVNEXT_STRIDE = 32  # total stride of every ConvNeXt (V1/V2) encoder: stem 4 x three 2x downsamplings


@dataclass
class MaskedBatch:
    """A batch of masked images (a dataclass: Lightning moves its tensors to the device)."""

    images: torch.Tensor  # (B, 3, H, W) float32, ImageNet-normalised
    mask: torch.Tensor  # (B, H / patch, W / patch) float32, 1 = masked
    index: torch.Tensor  # (B,) int64: index of the source image in the dataset's file list
    keys: torch.Tensor  # (B,) int64: draw keys (epoch * n + index), the per-item RNG seed


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursively, so ImageFolder class folders work too), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def random_resized_crop_box(
    h: int, w: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (10 tries of area-scale x log-uniform aspect, then a centre
    crop clamped to `ratio`), drawn under a torch seed taken from `rng`, so that a crop depends only on the
    draw key, in any worker: (x, y, width, height)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**63 - 1)))
        size_only = torch.empty(1, 1, 1).expand(1, h, w)  # get_params reads only the size: no h x w buffer
        top, left, ch, cw = RandomResizedCrop.get_params(size_only, list(scale), list(ratio))
    return int(left), int(top), int(cw), int(ch)


def patch_mask(rng: np.random.Generator, gh: int, gw: int, mask_ratio: float) -> np.ndarray:
    """(gh, gw) float32 mask with exactly num_masked(gh*gw, ratio) ones at random places."""
    L = gh * gw
    mask = np.zeros(L, np.float32)
    mask[rng.permutation(L)[: num_masked(L, mask_ratio)]] = 1.0
    return mask.reshape(gh, gw)


class MaskedImageDataset(Dataset):
    """Item for draw key k: (uint8 HxWx3 crop, mask, image index, k)."""

    def __init__(
        self,
        files: list[Path],
        image_size: int = 224,
        patch_size: int = 32,
        mask_ratio: float = 0.6,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.files = list(files)
        self.image_size, self.patch_size, self.mask_ratio = int(image_size), int(patch_size), float(mask_ratio)
        self.crop_scale, self.crop_ratio, self.flip_p, self.seed = tuple(crop_scale), tuple(crop_ratio), flip_p, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        index = int(key) % len(self.files)
        rng = np.random.default_rng([self.seed, int(key)])
        image = read_image(self.files[index])
        x, y, cw, ch = random_resized_crop_box(*image.shape[:2], rng, self.crop_scale, self.crop_ratio)
        s = self.image_size
        crop = cv2.resize(image[y:y + ch, x:x + cw], (s, s), interpolation=cv2.INTER_CUBIC)  # bicubic, as official
        if rng.random() < self.flip_p:
            crop = cv2.flip(crop, 1)
        g = s // self.patch_size
        return crop, patch_mask(rng, g, g, self.mask_ratio), index, int(key)


class EpochKeySampler(DistributedSampler):
    """A seeded shuffle per epoch, sharded over ranks (drop_last under DDP: no image twice in a step),
    yielding draw keys ``epoch * n + index``. A DistributedSampler so Lightning keeps it and calls
    ``set_epoch``."""

    def __init__(self, dataset: MaskedImageDataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=num_replicas > 1)

    def __iter__(self):
        base = self.epoch * len(self.dataset)  # type: ignore[arg-type]
        return (base + i for i in super().__iter__())


def collate_masked(items: list[tuple[np.ndarray, np.ndarray, int, int]]) -> MaskedBatch:
    return MaskedBatch(
        images=normalize_uint8([it[0] for it in items]),
        mask=torch.from_numpy(np.stack([it[1] for it in items])),
        index=torch.tensor([it[2] for it in items], dtype=torch.long),
        keys=torch.tensor([it[3] for it in items], dtype=torch.long),
    )


def check_geometry(image_size: int, patch_size: int, stride: int = CONVNEXT_STRIDE) -> None:
    if patch_size <= 0 or patch_size % stride:
        raise UserError(f"patch_size {patch_size} must be a positive multiple of the encoder's total stride {stride}")
    if image_size % patch_size:
        raise UserError(f"data.image_size {image_size} must be a multiple of patch_size {patch_size}")


class MaskedDataModule(L.LightningDataModule):
    """Train images of a dataset (``datamodules.layout.resolve_dataset``; the embedded set when
    ``data_root`` is None) as ``MaskedBatch``es."""

    def __init__(self, cfg: Any) -> None:
        """From the run config: ``cfg.seed``, ``cfg.data.*`` and ``cfg.model.{patch_size, mask_ratio}``
        (configs/base.yaml, configs/fcmae.yaml)."""
        super().__init__()
        d, m = cfg.data, cfg.model
        image_size, patch_size, mask_ratio = int(d.image_size), int(m.patch_size), float(m.mask_ratio)
        check_geometry(image_size, patch_size, CONVNEXT_STRIDE)
        num_masked(1, mask_ratio)
        self.data_root, self.seed = d.get("root"), int(cfg.get("seed", 0))
        self.embedded_size = int(d.get("embedded_size", 300))
        self.batch_size, self.num_workers = int(d.batch_size), int(d.num_workers)
        self.pin_memory = bool(d.get("pin_memory", True))
        self.dataset_kwargs = dict(image_size=image_size, patch_size=patch_size, mask_ratio=mask_ratio,
                                   crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio),
                                   flip_p=float(d.flip_p), seed=self.seed)
        self._train: MaskedImageDataset | None = None

    def prepare_data(self) -> None:
        self._files()  # builds the embedded dataset on first use (local rank 0)

    def _files(self) -> list[Path]:
        from datamodules.layout import resolve_dataset

        paths = resolve_dataset(self.data_root, embedded_size=self.embedded_size, seed=self.seed, need_val=False)
        return list_images(paths.train_images)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = MaskedImageDataset(self._files(), **self.dataset_kwargs)

    @property
    def train_dataset(self) -> MaskedImageDataset:
        self.setup()
        assert self._train is not None
        return self._train

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        world = int(self.trainer.world_size) if self.trainer is not None else 1
        rank = int(self.trainer.global_rank) if self.trainer is not None else 0
        sampler = EpochKeySampler(dataset, num_replicas=world, rank=rank, seed=self.seed)
        if len(sampler) < self.batch_size:  # drop_last would leave the epoch empty: nothing would train
            where = self.data_root or "the embedded dataset"
            raise UserError(f"{where}: {len(dataset)} training images give {len(sampler)} per process "
                            f"({world} process(es)), fewer than data.batch_size={self.batch_size}: lower "
                            "data.batch_size or add images")
        return DataLoader(
            dataset, batch_size=self.batch_size, drop_last=True,
            sampler=sampler,
            num_workers=self.num_workers, collate_fn=collate_masked,
            pin_memory=self.pin_memory and torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )

    def write_preview(self, out_dir: str | os.PathLike, n: int = 8) -> list[Path]:
        """PNG per item of the first epoch: the crop and the masked crop (masked patches grey) side by side."""
        from PIL import Image

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dataset, paths = self.train_dataset, []
        p = dataset.patch_size
        for k in range(min(n, len(dataset))):
            crop, mask, index, _ = dataset[k]
            masked = crop.copy()
            masked[np.kron(mask, np.ones((p, p), np.float32)) > 0] = 128
            path = out_dir / f"masked_{k:03d}_{dataset.files[index].stem}.png"
            Image.fromarray(np.concatenate([crop, masked], axis=1)).save(path)
            paths.append(path)
        return paths
