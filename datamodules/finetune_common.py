"""Pieces shared by the fine-tuning DataModules: the labelled subset (label-efficient setting), the
validation sampler and the loader settings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from common.errors import UserError


def labelled_subset(n: int, fraction: float | None = None, count: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of the labelled images to train on: the first k of one fixed permutation of
    range(n) drawn from `seed`, k = round(fraction * n) (at least 1) or `count`.

    Deterministic, and nested: for the same n and seed, the 10% subset lies inside the 20% one (a
    prefix of the same permutation). None for both = all images."""
    if fraction is not None and count is not None:
        raise UserError("give --label-fraction or --label-count, not both")
    if fraction is None and count is None:
        return np.arange(n)
    if fraction is not None:
        if not 0.0 < float(fraction) <= 1.0:
            raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
        k = max(1, int(math.floor(float(fraction) * n + 0.5)))
    else:
        if int(count) < 1:
            raise UserError(f"--label-count must be >= 1, got {count}")
        k = int(count)
        if k > n:
            raise UserError(f"--label-count {k} is more than the {n} labelled training images")
    order = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(order[:k])


def subset_from_config(n: int, cfg: DictConfig) -> np.ndarray:
    d = cfg.data
    return labelled_subset(n, d.get("label_fraction"), d.get("label_count"), int(d.get("subset_seed", 0)))


def loader_kwargs(cfg: DictConfig) -> dict[str, Any]:
    workers = int(cfg.data.num_workers)
    return dict(num_workers=workers, pin_memory=bool(cfg.data.pin_memory) and torch.cuda.is_available(),
                persistent_workers=workers > 0)


def val_loader(dataset: Dataset, batch_size: int, collate_fn: Any, cfg: DictConfig) -> DataLoader:
    """Validation loader. Under DDP each image is evaluated on exactly one rank
    (`UnrepeatedDistributedSampler`; Lightning's default sampler would pad with duplicates, which would
    count some images twice in the dataset-level metrics)."""
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=collate_fn,
                      **loader_kwargs(cfg))
