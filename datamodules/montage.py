"""Montage batches for montage ("Jigsaw") pre-training (Zhou et al., ECCV 2020, Sec. 3.2).

One montage = 2 S + 1 T + 1 W samples from the sample bank (datamodules/sample_bank.py) on a canvas cut
into four preset cells (models/layout.py): the S sample with the smaller *scaled* area (w*h after the
random rescale, i.e. the footprint it would have on the canvas) top-left, the larger S bottom-right,
T bottom-left, W top-right.

Per sample: a random rescale by ``scale ~ U[scale_range]`` (default [0.8, 1.5], relative to the
source-image pixels, aspect kept) and a horizontal flip with probability ``flip_p``; then it is fitted
into its cell *without warping*, independently per axis: if the scaled sample is smaller than the cell
it is zero-padded, placed at a uniformly random offset inside the cell (``pad="random"``, the default;
``pad="center"`` centres it); if larger, a uniformly random window of the cell's size is kept.

How it is made fast (no per-pixel Python, nothing resized that is thrown away): the visible window is
worked out first, in the coordinates of the stored crop, as a whole-pixel region; only that region
(a view into the memory-mapped bank) is resized with ``cv2.resize`` (``INTER_LINEAR``; the rescale
never shrinks below 0.8x) straight into the canvas slice, then mirrored in place with ``cv2.flip``
(a negative-stride numpy slice copy of the same pixels measured about 10x slower).
The sizes are whole pixels: a scaled sample is ``round(w * scale) x round(h * scale)``; when it is
cropped, the kept source region is ``round(cell / factor)`` source pixels long, so the realised factor
per axis (``extra["realised_scale"]``) equals ``scale`` up to that rounding (half a source pixel over
the span) -- the same rounding any resize to whole pixels has, and no other geometric change. So a
cell is exactly ``cv2.resize`` of the source region ``extra["crop_in_source"]`` to the ``cell_box``
size (then mirrored); against "resize the whole sample, flip, cut the window" it is identical when
the whole sample is visible, and differs by a sub-pixel phase of the window when it is cropped.

Cell metadata. ``assemble`` returns, per cell in POSITIONS order, a ``CellInfo`` (a dict) with exactly
the keys ``CELL_KEYS``:

- ``position``: the preset cell; ``group``: the aspect group of the sample actually used (differs
  from the cell's group only under the short-group fallback); ``label``: 0..C-1, C = background;
  ``category_id``: COCO category id, None for background; ``image_id``: COCO image id;
- ``source_box`` [x, y, w, h]: the (expanded) sample box in source-image pixels;
- ``scale``: the drawn rescale factor relative to source-image pixels; ``flip``: bool;
- ``cell_box`` [x, y, w, h]: the part of the canvas actually covered by the sample's pixels (the
  rest of the preset cell, if any, is zero padding). The preset cells are ``layout.cell_boxes()``.

Everything else lives in ``cell.extra`` (an attribute, not a key, so JSON dumps and key checks see
only the fields above): ``index`` (bank index), ``preset_cell``, ``pad`` (mode), ``pad_offset`` [x, y]
of the content inside the preset cell, ``scaled_size`` [w, h] of the whole rescaled sample,
``crop_in_scaled`` [x, y, w, h] (the kept window inside the rescaled *and flipped* sample),
``crop_in_source`` [x, y, w, h] (the kept region inside the *unflipped* source box, in source pixels;
fractional only for crops stored downscaled), ``crop_in_stored`` (the same in stored-crop pixels),
``realised_scale`` [sx, sy], ``requested_group`` (the cell's group; differs from ``group`` under the
fallback).

Short groups: when a group has no samples, its cells draw from the nearest group in aspect (T -> S -> W,
W -> S -> T, S -> W -> T: 1.5 is closer to 1 than 0.5 is in log-aspect) and are fitted by the same
pad/crop; this is logged once per bank and group (warning). An empty bank is an error.

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
import logging
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
from datamodules.sample_bank import (
    BANK_VERSION,
    DEFAULT_NEGATIVES_AVOID,
    GROUPS,
    SampleBank,
    ann_file_fingerprint,
    check_negatives_avoid,
    read_bank_settings,
)
from models.layout import POSITION_GROUPS, POSITIONS, MontageLayout

log = logging.getLogger(__name__)

CELL_KEYS: tuple[str, ...] = (
    "position", "group", "label", "category_id", "image_id", "source_box", "scale", "flip", "cell_box",
)
FALLBACK_ORDER: dict[str, tuple[str, ...]] = {
    "T": ("T", "S", "W"),
    "W": ("W", "S", "T"),
    "S": ("S", "W", "T"),
}
PAD_MODES = ("random", "center")
ERF_STREAM = 2**32 - 1  # the "rank" of the fixed ERF montages: a stream no training rank uses

_warned_fallbacks: set[tuple[str, str]] = set()  # (bank dir, group): log the fallback once per process


class CellInfo(dict):
    """One cell's metadata: the ``CELL_KEYS`` as dict items, internal fields in ``.extra``."""

    def __init__(self, *args: Any, extra: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra: dict[str, Any] = extra or {}


def _fit_axis(scaled: int, stored: int, cell: int, pad: str, u: float) -> tuple[int, int, int, int]:
    """One axis of the fit, with ``u`` uniform in [0, 1) for the random offset. Returns (p, m, n, off):
    stored region start/length, output length, and the content's offset inside the cell."""
    if scaled <= cell:  # pad: whole sample visible
        off = min(int(u * (cell - scaled + 1)), cell - scaled) if pad == "random" else (cell - scaled) // 2
        return 0, stored, scaled, off
    m = min(stored, max(1, round(cell * stored / scaled)))  # stored pixels that survive the crop
    return min(int(u * (stored - m + 1)), stored - m), m, cell, 0


class Placement(NamedTuple):
    """How one bank sample was put into one cell (what ``CellInfo`` is computed from)."""

    position: str
    index: int  # bank index
    label: int  # the sample's class label (what the cell is trained to predict)
    group: str  # the group the sample came from
    scale: float
    flip: bool
    stored_size: tuple[int, int]  # (w, h) of the stored crop
    scaled_size: tuple[int, int]  # (w, h) of the whole rescaled sample
    crop_in_stored: tuple[int, int, int, int]  # kept region of the stored crop (x, y, w, h)
    out_size: tuple[int, int]  # (w, h) of the content in the canvas
    pad_offset: tuple[int, int]  # content offset inside the preset cell


# random numbers per montage, drawn in one call: for each of the 4 draws (in DRAW_ORDER) the pool pick,
# the scale, the flip and the x / y offsets of the pad or crop
_UNIFORMS_PER_DRAW = 5
DRAW_ORDER: tuple[str, ...] = ("top_right", "bottom_left", "top_left", "bottom_right")


class MontageAssembler:
    """Assembles montages from a ``SampleBank`` on a ``MontageLayout`` (see the module docstring)."""

    def __init__(
        self,
        bank: SampleBank,
        layout: MontageLayout,
        scale_range: tuple[float, float] = (0.8, 1.5),
        flip_p: float = 0.5,
        pad: str = "random",
    ) -> None:
        if len(bank) == 0:
            raise UserError(
                f"sample bank {bank.directory} is empty: the detection set has no usable boxes "
                "(check the annotation file and min_box_side)"
            )
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise UserError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not 0.0 <= flip_p <= 1.0:
            raise UserError(f"flip_p must lie in [0, 1], got {flip_p}")
        if pad not in PAD_MODES:
            raise UserError(f"pad must be one of {PAD_MODES}, got {pad!r}")
        self.bank = bank
        self.layout = layout
        self.scale_range = (lo, hi)
        self.flip_p = float(flip_p)
        self.pad = pad
        self.cells = layout.cell_boxes()
        self.pools: dict[str, np.ndarray] = {g: bank.group_indices(g) for g in GROUPS}
        # per-sample fields as Python ints (numpy scalar access costs more than the pixel work here)
        self._pool_lists: dict[str, list[int]] = {g: v.tolist() for g, v in self.pools.items()}
        self._boxes: list[list[int]] = bank.source_boxes.tolist()
        self._labels: list[int] = bank.labels.tolist()
        self._cats: list[int] = bank.category_ids.tolist()
        self._image_ids: list[int] = bank.image_ids.tolist()
        self.source_group: dict[str, str] = {}
        for g in GROUPS:
            src = next(s for s in FALLBACK_ORDER[g] if len(self.pools[s]))
            self.source_group[g] = src
            key = (str(bank.directory), g)
            if src != g and key not in _warned_fallbacks:
                _warned_fallbacks.add(key)
                log.warning(
                    "sample bank %s has no %s samples: %s cells use %s samples instead (fitted by pad/crop)",
                    bank.directory, g, g, src,
                )

    def assemble(
        self, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[CellInfo]]:
        """One montage: (canvas uint8 HxWx3 RGB, one ``CellInfo`` per cell in POSITIONS order).

        ``out``: an HxWx3 uint8 array to draw into (zeroed first) instead of a new canvas."""
        canvas, placements = self.compose(rng, out)
        return canvas, [self.cell_info(p) for p in placements]

    def compose(
        self, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[Placement]]:
        """As ``assemble`` but returns the raw ``Placement`` of each cell (the training path: labels and
        cell boxes without building the metadata dicts). Same random draws, so the same canvas."""
        lo, hi = self.scale_range
        u = rng.random(_UNIFORMS_PER_DRAW * len(DRAW_ORDER)).tolist()
        draws: dict[str, tuple[int, str, float, bool, float, float]] = {}
        s_draws = []
        for k, pos in enumerate(DRAW_ORDER):
            src = self.source_group[POSITION_GROUPS[pos]]
            pool = self._pool_lists[src]
            pick, scale, flip, ux, uy = u[_UNIFORMS_PER_DRAW * k : _UNIFORMS_PER_DRAW * (k + 1)]
            draw = (pool[min(int(pick * len(pool)), len(pool) - 1)], src, lo + (hi - lo) * scale,
                    flip < self.flip_p, ux, uy)
            if POSITION_GROUPS[pos] == "S":
                s_draws.append(draw)
            else:
                draws[pos] = draw

        def scaled_area(d: tuple[int, str, float, bool, float, float]) -> int:
            _, _, bw, bh = self._boxes[d[0]]
            return max(1, round(bw * d[2])) * max(1, round(bh * d[2]))

        small, large = sorted(s_draws, key=scaled_area)  # stable: ties keep draw order
        draws["top_left"], draws["bottom_right"] = small, large

        h, w = self.layout.canvas
        if out is None:
            canvas = np.zeros((h, w, 3), np.uint8)
        else:
            if out.shape != (h, w, 3) or out.dtype != np.uint8:
                raise ValueError(f"out must be a ({h}, {w}, 3) uint8 array, got {out.shape} {out.dtype}")
            canvas = out
            canvas.fill(0)
        return canvas, [self._place(canvas, pos, *draws[pos]) for pos in POSITIONS]

    def _place(
        self, canvas: np.ndarray, pos: str, idx: int, src_group: str, scale: float, flip: bool, ux: float, uy: float
    ) -> Placement:
        cx, cy, cw, ch = self.cells[pos]
        _, _, bw, bh = self._boxes[idx]
        crop = self.bank.crop(idx)
        sh, sw = crop.shape[:2]
        ws, hs = max(1, round(bw * scale)), max(1, round(bh * scale))
        px, mw, nw, ox = _fit_axis(ws, sw, cw, self.pad, ux)
        py, mh, nh, oy = _fit_axis(hs, sh, ch, self.pad, uy)
        region = crop[py : py + mh, px : px + mw]
        dst = canvas[cy + oy : cy + oy + nh, cx + ox : cx + ox + nw]
        if (mw, mh) == (nw, nh):  # no resampling needed (scale realised as exactly 1)
            if flip:
                cv2.flip(region, 1, dst=dst)
            else:
                dst[...] = region
        else:
            res = cv2.resize(region, (nw, nh), dst=dst, interpolation=cv2.INTER_LINEAR)
            if res is not dst:  # OpenCV fell back to a new array (never seen for canvas slices)
                dst[...] = res
            if flip:
                cv2.flip(dst, 1, dst=dst)  # in place: the resize is mirror-symmetric, so this equals
                # resizing the mirrored region
        return Placement(pos, idx, self._labels[idx], src_group, scale, flip, (sw, sh), (ws, hs), (px, py, mw, mh),
                         (nw, nh), (ox, oy))

    def cell_box(self, p: Placement) -> list[int]:
        """[x, y, w, h] of the canvas covered by the sample's pixels."""
        cx, cy, _, _ = self.cells[p.position]
        return [cx + p.pad_offset[0], cy + p.pad_offset[1], *p.out_size]

    def cell_info(self, p: Placement) -> CellInfo:
        """The metadata of one placed cell (``CELL_KEYS`` and ``.extra``, see the module docstring)."""
        bx, by, bw, bh = self._boxes[p.index]
        sw, sh = p.stored_size
        ws, hs = p.scaled_size
        px, py, mw, mh = p.crop_in_stored
        nw, nh = p.out_size
        fx, fy = sw / bw, sh / bh  # stored pixels per source pixel (1 unless capped)
        ux = min(round(px * ws / sw), ws - nw)  # window start in the rescaled sample (before the flip)
        uy = min(round(py * hs / sh), hs - nh)
        cat = self._cats[p.index]
        extra = {
            "index": int(p.index),
            "requested_group": POSITION_GROUPS[p.position],
            "preset_cell": list(self.cells[p.position]),
            "pad": self.pad,
            "pad_offset": list(p.pad_offset),
            "scaled_size": [ws, hs],
            "crop_in_scaled": [ws - ux - nw if p.flip else ux, uy, nw, nh],
            "crop_in_source": [_num(px / fx), _num(py / fy), _num(mw / fx), _num(mh / fy)],
            "crop_in_stored": [px, py, mw, mh],
            "realised_scale": [nw / mw * fx, nh / mh * fy],
        }
        return CellInfo(
            position=p.position,
            group=p.group,
            label=p.label,
            category_id=None if cat < 0 else cat,
            image_id=self._image_ids[p.index],
            source_box=[bx, by, bw, bh],
            scale=p.scale,
            flip=bool(p.flip),
            cell_box=self.cell_box(p),
            extra=extra,
        )


def _num(v: float) -> int | float:
    """An int when the value is whole (uncapped crops), else the float."""
    return int(v) if float(v).is_integer() else float(v)


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
    default of ``datamodules.layout.cache_root``; never the dataset folder), or ``bank_dir``. ``setup`` opens it.
    ``num_classes`` counts the background (C + 1). ``max_side`` (stored crop cap) defaults to 2x the
    canvas; ``epoch_size`` (montages per epoch, all ranks together) to ``len(bank) // 4``.
    """

    def __init__(
        self,
        data_root: str | os.PathLike | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        canvas: int | tuple[int, int] = 224,
        split: tuple[float, float] = (0.4, 0.4),
        scale_range: tuple[float, float] = (0.8, 1.5),
        flip_p: float = 0.5,
        neg_ratio: float = 0.1,
        negatives_avoid: str = DEFAULT_NEGATIVES_AVOID,
        bank_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        label_fraction: float | None = None,
        label_count: int | None = None,
        subset_seed: int = 0,
        seed: int = 0,
        epoch_size: int | None = None,
        embedded_size: int = 300,
        pin_memory: bool = True,
        max_side: int | None = None,
        pad: str = "random",
    ) -> None:
        super().__init__()
        # The bank is written to the cache folder, which every node of a cluster job must see (a shared file
        # system, as the run folder must be for requeueing; pass --cache-dir otherwise): built once, on global rank 0.
        self.prepare_data_per_node = False
        self.data_root = data_root
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        hw = (int(canvas), int(canvas)) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))
        self._layout = MontageLayout(canvas=hw, split=(float(split[0]), float(split[1])))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_p = float(flip_p)
        self.neg_ratio = float(neg_ratio)
        self.negatives_avoid = check_negatives_avoid(negatives_avoid)
        self.bank_dir = bank_dir
        self.cache_dir = cache_dir
        self.label_fraction = None if label_fraction is None else float(label_fraction)
        self.label_count = None if label_count is None else int(label_count)
        self.subset_seed = int(subset_seed)
        self.seed = int(seed)
        self.epoch_size = epoch_size
        self.embedded_size = int(embedded_size)
        self.pin_memory = bool(pin_memory)
        self.max_side = int(max_side) if max_side is not None else 2 * max(hw)
        self.pad = pad
        self._bank: SampleBank | None = None
        self._assembler: MontageAssembler | None = None
        self._train: MontageDataset | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> MontageDataModule:
        """From the run config (``cfg.seed``, ``cfg.data.*``; see configs/montage.yaml)."""
        data = cfg.data
        kwargs: dict[str, Any] = {"data_root": data.get("root"), "seed": int(cfg.get("seed", 0))}
        for key in ("batch_size", "num_workers", "canvas", "split", "scale_range", "flip_p", "neg_ratio",
                    "negatives_avoid", "epoch_size", "embedded_size", "pin_memory", "max_side", "cache_dir",
                    "label_fraction", "label_count", "subset_seed"):
            if data.get(key) is not None:
                value = data.get(key)
                kwargs[key] = tuple(value) if key in ("split", "scale_range") or (
                    key == "canvas" and not isinstance(value, int)) else value
        return cls(**kwargs)

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
                "negatives_avoid": self.negatives_avoid, "max_side": self.max_side, "version": BANK_VERSION,
                **({"label_fraction": self.label_fraction, "label_count": self.label_count,
                    "subset_seed": self.subset_seed} if self.label_fraction or self.label_count else {})}

    def bank_path(self, paths: Any | None = None) -> Path:
        """Where the bank lives: ``bank_dir`` or ``<cache>/sample_bank/<hash of annotation file + settings>``."""
        if self.bank_dir is not None:
            return Path(self.bank_dir)
        from datamodules.layout import cache_root

        paths = paths if paths is not None else self._paths()
        key = json.dumps(self._bank_settings_key(paths.train_ann), sort_keys=True)
        return cache_root(self.cache_dir) / "sample_bank" / hashlib.sha1(key.encode()).hexdigest()[:12]

    def _bank_is_current(self, directory: Path, ann_file: str | os.PathLike) -> bool:
        settings = read_bank_settings(directory)
        if settings is None:
            return False
        want = self._bank_settings_key(ann_file)
        # the labelled-subset keys only name the folder; the stored dataset_hash already covers the subset
        return all(settings.get(k) == v for k, v in want.items() if k not in ("label_fraction", "label_count",
                                                                               "subset_seed"))

    def prepare_data(self) -> None:
        """Resolve the dataset and build the bank if it is missing or stale (rank 0 only)."""
        paths = self._paths()
        out = self.bank_path(paths)
        if self._bank_is_current(out, paths.train_ann):
            return
        from datamodules.readers import load_coco

        coco = load_coco(paths.train_ann, paths.train_images)
        if self.label_fraction is not None or self.label_count is not None:
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
        self._assembler = MontageAssembler(self._bank, self._layout, self.scale_range, self.flip_p, self.pad)
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
