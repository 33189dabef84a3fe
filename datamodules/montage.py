"""Montage pre-training data (Zhou et al., ECCV 2020, Sec. 3.2): the dataset, sampler, batch and
DataModule around the assembler (``datamodules/montage_assembler.py``, which documents how one montage
is made), and preview writing.

Data loading: ``MontageDataset`` item ``i`` is the montage of ``default_rng([seed, rank, i])``
(deterministic, independent of the number of workers); ``MontageSampler`` shards indices over DDP
ranks and offsets them by ``epoch * epoch_size`` so that every epoch brings new montages.
The workers emit **uint8** batches (FFCV/DALI style): ``collate_montages`` copies the canvases into one
(B, H, W, 3) uint8 block and hands it out as a (B, 3, H, W) view (channels-last memory, no transpose
on the CPU), so a worker writes, and sends to the main process, 150 KB per 224x224 montage instead of
600 KB of float32. The ImageNet normalisation runs on the training device, after the batch has been
moved there: ``normalize_images`` (one function, in ``common.images``, used by
``MontageModule.on_after_batch_transfer`` and by ``MontageDataModule.erf_images``), which also sets the
memory format the model wants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from common.errors import UserError
from common.images import annotate_montage, new_batch_tensor, normalize_images
from datamodules.montage_assembler import CELL_KEYS, ERF_STREAM, CellInfo, MontageAssembler
from datamodules.sample_bank import BANK_VERSION, SampleBank, ann_file_fingerprint, read_bank_settings
from datamodules.sample_plan import check_negatives_avoid
from models.montage_canvas import MontageLayout

# --------------------------------------------------------------------------------------------------
# Dataset, sampler, batch
# --------------------------------------------------------------------------------------------------


class MontageItem(NamedTuple):
    """One dataset item (before collation). Labels and boxes stay Python ints here: ``collate_montages``
    makes one tensor of each per batch (two small tensors per item cost more than a whole resize)."""

    image: torch.Tensor  # (H, W, 3) uint8 RGB canvas
    labels: tuple[int, ...]  # 4 labels, POSITIONS order
    cell_boxes: tuple[list[int], ...]  # 4 x [x, y, w, h] of each cell's content
    index: int


class MontageDataset(Dataset):
    """Montages on demand. Item ``index`` is assembled with ``default_rng([seed, rank, index])``, so it is
    deterministic for a seed and independent of workers; ``MontageSampler`` feeds epoch-offset indices
    (``epoch * len + i``) so every epoch sees new montages, and ranks get disjoint indices (and, with
    ``rank`` given, different streams as well). ``len`` is the epoch size; any index >= 0 is valid."""

    def __init__(self, assembler: MontageAssembler, epoch_size: int, seed: int = 0, rank: int = 0) -> None:
        if epoch_size < 1:
            raise UserError(f"epoch_size must be >= 1, got {epoch_size}")
        self.assembler = assembler
        self.epoch_size = int(epoch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self._buffer: np.ndarray | None = None  # reused canvases for __getitems__

    def __len__(self) -> int:
        return self.epoch_size

    def montage(self, index: int) -> tuple[np.ndarray, list[CellInfo]]:
        """The canvas and cell metadata of item ``index``."""
        if index < 0:
            raise IndexError(f"montage index must be >= 0, got {index}")
        return self.assembler.assemble(np.random.default_rng([self.seed, self.rank, int(index)]))

    def __getitem__(self, index: int) -> MontageItem:
        return self._item(index, None)

    def __getitems__(self, indices: Sequence[int]) -> list[MontageItem]:
        """A batch of items, as the DataLoader fetches them (``collate_fn(dataset.__getitems__(idx))``).

        The canvases are drawn into one (B, H, W, 3) buffer that this dataset object reuses from batch
        to batch: fresh canvases cost page faults that made up about a third of the assembly time.
        The returned images are therefore views that stay valid only until the next call; the
        collate function consumes them at once (``collate_montages`` copies them into the batch)."""
        h, w = self.assembler.layout.canvas
        n = len(indices)
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = np.zeros((n, h, w, 3), np.uint8)
        return [self._item(i, self._buffer[k]) for k, i in enumerate(indices)]

    def _item(self, index: int, out: np.ndarray | None) -> MontageItem:
        if index < 0:
            raise IndexError(f"montage index must be >= 0, got {index}")
        asm = self.assembler
        canvas, placements = asm.compose(np.random.default_rng([self.seed, self.rank, int(index)]), out)
        return MontageItem(
            image=torch.from_numpy(canvas),
            labels=tuple(p.label for p in placements),
            cell_boxes=tuple(asm.cell_box(p) for p in placements),
            index=int(index),
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buffer"] = None  # per process; never pickled to workers
        return state


def batches_done_in_epoch(trainer: L.Trainer | None) -> int:
    """Batches of the current epoch already trained on when a run resumes mid-epoch (0 otherwise).

    Lightning restores the loop progress before it asks for the train dataloader; a plain DataLoader
    would restart the epoch from its first batch, so a resumed run would see other data than an
    uninterrupted one. The sampler skips these batches instead: same data, same final weights.
    `processed` (not `completed`) counts a batch whose step ran before a checkpoint written in
    on_train_batch_end; Lightning itself only fixes `completed` up later, in the epoch loop's reset."""
    if trainer is None:
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class MontageSampler(DistributedSampler):
    """Sequential indices of this rank's shard (``drop_last``: no index is seen by two ranks), offset by
    ``epoch * len(dataset)`` so that each epoch draws fresh montages. A ``DistributedSampler`` so that
    Lightning keeps it (and calls ``set_epoch``) instead of injecting its own."""

    def __init__(self, dataset: MontageDataset, num_replicas: int = 1, rank: int = 0, skip: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=num_replicas > 1)
        # indices of the first epoch iterated to skip (already trained on before a resume). A whole epoch
        # means the checkpoint was written after the epoch's last batch: Lightning then starts the next
        # epoch, from its first batch.
        self.skip = skip if skip < super().__len__() else 0

    def __iter__(self):
        base = self.epoch * len(self.dataset)  # type: ignore[arg-type]
        skip, self.skip = self.skip, 0
        return (base + i for k, i in enumerate(super().__iter__()) if k >= skip)


@dataclass
class MontageBatch:
    """A batch of montages."""

    images: torch.Tensor  # (B, 3, H, W) uint8 RGB, channels-last memory (normalise with normalize_images)
    labels: torch.Tensor  # (B, 4) long, labels of the cells in POSITIONS order (C = background)
    cell_boxes: torch.Tensor  # (B, 4, 4) long x, y, w, h of each cell's content in the canvas
    index: torch.Tensor  # (B,) long dataset index of each montage (epoch-offset; unique across ranks)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MontageBatch:
        return MontageBatch(*(t.to(device, non_blocking=non_blocking) for t in self._fields()))

    def pin_memory(self) -> MontageBatch:
        return MontageBatch(*(t.pin_memory() for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.labels, self.cell_boxes, self.index

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_montages(items: Sequence[MontageItem]) -> MontageBatch:
    """Stack items into a ``MontageBatch`` with **uint8** images (normalisation happens on the device,
    ``normalize_images``). The canvases are copied as they are, HxWx3, into one (B, H, W, 3) block
    (a plain memory copy per image; in a worker, straight into shared memory) and ``images`` is its
    (B, 3, H, W) permuted view: channels-first shape, channels-last strides. Transposing to NCHW here
    instead measured about 6x slower than the copy on one core; ``normalize_images`` changes the layout
    anyway, on the device."""
    first = items[0].image
    h, w = first.shape[:2]
    result = new_batch_tensor((len(items), h, w, 3), torch.uint8)
    out = result.numpy()
    for i, it in enumerate(items):
        arr = it.image.numpy() if isinstance(it.image, torch.Tensor) else it.image
        if arr.dtype != np.uint8 or arr.shape != (h, w, 3):
            raise ValueError(f"expected ({h}, {w}, 3) uint8 images, got {arr.shape} {arr.dtype}")
        out[i] = arr
    return MontageBatch(
        images=result.permute(0, 3, 1, 2),
        labels=torch.tensor([it.labels for it in items], dtype=torch.long),
        cell_boxes=torch.tensor([it.cell_boxes for it in items], dtype=torch.long),
        index=torch.tensor([it.index for it in items], dtype=torch.long),
    )


# --------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------


class MontageDataModule(L.LightningDataModule):
    """Detection set -> sample bank (built once, cached) -> montage batches.

    ``prepare_data`` (global rank 0) resolves the dataset (``datamodules.layout.resolve_dataset``; the
    embedded set when ``data_root`` is None) and builds the bank from its train split into
    ``<cache>/sample_bank/<hash of the annotation file and settings>/`` (``cache``: ``cache_dir`` or the
    default of ``datamodules.layout.cache_root``; never the dataset folder). ``setup`` opens it.
    ``num_classes`` counts the background (C + 1). ``max_side`` (stored crop cap) defaults to 2x the
    canvas; ``epoch_size`` (montages per epoch, all ranks together) to ``len(bank) // 4``.
    """

    def __init__(self, cfg: Any) -> None:
        """From the run config: ``cfg.seed`` and ``cfg.data.*`` (configs/base.yaml, configs/montage.yaml)."""
        super().__init__()
        # The bank is written to the cache folder, which every node of a cluster job must see (a shared file
        # system, as the run folder must be for requeueing; pass --cache-dir otherwise): built once, on global rank 0.
        self.prepare_data_per_node = False
        d = cfg.data
        self.data_root = d.get("root")
        self.batch_size = int(d.batch_size)
        self.num_workers = int(d.num_workers)
        canvas = d.canvas
        hw = (int(canvas), int(canvas)) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))
        self._layout = MontageLayout(canvas=hw, split=(float(d.split[0]), float(d.split[1])))
        self.scale_range = (float(d.scale_range[0]), float(d.scale_range[1]))
        self.flip_p = float(d.flip_p)
        self.neg_ratio = float(d.neg_ratio)
        self.negatives_avoid = check_negatives_avoid(str(d.negatives_avoid))
        self.cache_dir = d.get("cache_dir")
        self.label_fraction = None if d.get("label_fraction") is None else float(d.label_fraction)
        self.label_count = None if d.get("label_count") is None else int(d.label_count)
        self.subset_seed = int(d.get("subset_seed", 0))
        self.seed = int(cfg.get("seed", 0))
        self.epoch_size = None if d.get("epoch_size") is None else int(d.epoch_size)
        self.embedded_size = int(d.get("embedded_size", 300))
        self.pin_memory = bool(d.get("pin_memory", True))
        self.max_side = int(d.max_side) if d.get("max_side") is not None else 2 * max(hw)
        self._bank: SampleBank | None = None
        self._assembler: MontageAssembler | None = None
        self._train: MontageDataset | None = None

    # -- properties ---------------------------------------------------------------------------------

    @property
    def layout(self) -> MontageLayout:
        return self._layout

    @property
    def bank(self) -> SampleBank:
        if self._bank is None:
            raise RuntimeError("MontageDataModule: call prepare_data() and setup() first")
        return self._bank

    @property
    def assembler(self) -> MontageAssembler:
        if self._assembler is None:
            raise RuntimeError("MontageDataModule: call prepare_data() and setup() first")
        return self._assembler

    @property
    def train_dataset(self) -> MontageDataset:
        if self._train is None:
            raise RuntimeError("MontageDataModule: call prepare_data() and setup() first")
        return self._train

    @property
    def num_classes(self) -> int:
        """C object classes + 1 background."""
        return self.bank.num_classes

    @property
    def class_names(self) -> list[str]:
        """Names of labels 0..C ("background" last)."""
        return self.bank.class_names

    # -- data ---------------------------------------------------------------------------------------

    def _paths(self) -> Any:
        from datamodules.layout import resolve_dataset

        return resolve_dataset(self.data_root, embedded_size=self.embedded_size, seed=self.seed, need_val=False)

    def _bank_settings_key(self, ann_file: str | os.PathLike) -> dict[str, Any]:
        return {**ann_file_fingerprint(ann_file), "seed": self.seed, "neg_ratio": self.neg_ratio,
                "negatives_avoid": self.negatives_avoid, "max_side": self.max_side, "version": BANK_VERSION}

    def _subset_key(self) -> dict[str, Any]:
        """The labelled subset the bank is cut from ({} = every train image). It names the bank's folder;
        the bank's own stored dataset_hash already covers which images it holds."""
        if self.label_fraction is None and self.label_count is None:
            return {}
        return {"label_fraction": self.label_fraction, "label_count": self.label_count, "subset_seed": self.subset_seed}

    def bank_path(self, paths: Any | None = None) -> Path:
        """Where the bank lives: ``<cache>/sample_bank/<hash of annotation file + settings>``."""
        from datamodules.layout import cache_root

        paths = paths if paths is not None else self._paths()
        key = json.dumps({**self._bank_settings_key(paths.train_ann), **self._subset_key()}, sort_keys=True)
        return cache_root(self.cache_dir) / "sample_bank" / hashlib.sha1(key.encode()).hexdigest()[:12]

    def _bank_is_current(self, directory: Path, ann_file: str | os.PathLike) -> bool:
        settings = read_bank_settings(directory)
        if settings is None:
            return False
        want = self._bank_settings_key(ann_file)
        return all(settings.get(k) == v for k, v in want.items())

    def prepare_data(self) -> None:
        """Resolve the dataset and build the bank if it is missing or stale (rank 0 only)."""
        paths = self._paths()
        out = self.bank_path(paths)
        if self._bank_is_current(out, paths.train_ann):
            return
        from datamodules.readers import load_coco

        coco = load_coco(paths.train_ann, paths.train_images)
        if self._subset_key():
            from datamodules.finetune_common import labelled_subset

            chosen = labelled_subset(len(coco.images), self.label_fraction, self.label_count, self.subset_seed)
            coco = dataclasses.replace(coco, images=[coco.images[int(i)] for i in chosen])
        SampleBank.build(coco, out, seed=self.seed, neg_ratio=self.neg_ratio, max_side=self.max_side,
                         negatives_avoid=self.negatives_avoid)

    def setup(self, stage: str | None = None) -> None:
        """Open the bank (building it first if ``prepare_data`` was skipped) and make the dataset."""
        if self._train is not None:
            return
        paths = self._paths()
        out = self.bank_path(paths)
        if not self._bank_is_current(out, paths.train_ann):
            self.prepare_data()
        self._bank = SampleBank.open(out)
        self._assembler = MontageAssembler(self._bank, self._layout, self.scale_range, self.flip_p)
        epoch_size = self.epoch_size or max(1, len(self._bank) // 4)
        rank = int(self.trainer.global_rank) if self.trainer is not None else 0
        self._train = MontageDataset(self._assembler, epoch_size, seed=self.seed, rank=rank)

    def _ensure_setup(self) -> None:
        if self._train is None:
            self.prepare_data()
            self.setup("fit")

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        world = int(self.trainer.world_size) if self.trainer is not None else 1
        rank = int(self.trainer.global_rank) if self.trainer is not None else 0
        skip = batches_done_in_epoch(self.trainer) * self.batch_size
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=MontageSampler(dataset, num_replicas=world, rank=rank, skip=skip),
            num_workers=self.num_workers,
            collate_fn=collate_montages,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def erf_images(self, n: int = 4) -> torch.Tensor:
        """``n`` fixed montages (B, 3, H, W), normalised float32 (``normalize_images``, contiguous), for the
        ERF estimate (same for a seed, all ranks)."""
        self._ensure_setup()
        dataset = MontageDataset(self.assembler, max(1, n), seed=self.seed, rank=ERF_STREAM)
        items = [dataset[k] for k in range(n)]
        return normalize_images(collate_montages(items).images)

    def write_preview(self, out_dir: str | os.PathLike, n: int = 8, seed: int | None = None) -> list[Path]:
        """See module-level ``write_preview``."""
        return write_preview(self, out_dir, n, self.seed if seed is None else seed)


# --------------------------------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------------------------------

def write_preview(
    source: MontageDataModule | MontageAssembler, out_dir: str | os.PathLike, n: int = 8, seed: int = 0
) -> list[Path]:
    """Write ``n`` montages to ``out_dir``: ``montage_0000.png`` (the raw, un-normalised canvas,
    lossless), ``montage_0000_annotated.png`` (borders and class names, for people) and
    ``montage_0000.json`` (``{"canvas": [H, W], "cells": [...]}`` with the ``CELL_KEYS`` per cell).
    Montage k uses ``default_rng([seed, 0, k])``: for a DataModule it is training item k of epoch 0 on
    rank 0. Returns the raw PNG paths."""
    if isinstance(source, MontageDataModule):
        source._ensure_setup()
        assembler = source.assembler
    else:
        assembler = source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = assembler.bank.class_names
    dataset = MontageDataset(assembler, max(1, n), seed=seed, rank=0)
    paths = []
    for k in range(n):
        canvas, cells = dataset.montage(k)
        raw = out / f"montage_{k:04d}.png"
        if not cv2.imwrite(str(raw), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{raw}: could not write PNG")
        ann = annotate_montage(canvas, cells, names, assembler.layout)
        cv2.imwrite(str(out / f"montage_{k:04d}_annotated.png"), cv2.cvtColor(ann, cv2.COLOR_RGB2BGR))
        meta = {"canvas": list(assembler.layout.canvas), "cells": [{key: c[key] for key in CELL_KEYS} for c in cells]}
        (out / f"montage_{k:04d}.json").write_text(json.dumps(meta, indent=1))
        paths.append(raw)
    return paths
