"""The montage assembler: four bank samples on one canvas (Zhou et al., ECCV 2020, Sec. 3.2).

One montage = 2 S + 1 T + 1 W samples from the sample bank (datamodules/sample_bank.py) on a canvas cut
into four preset cells (models/montage_canvas.py): the S sample with the smaller *scaled* area (w*h after the
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
"""


from __future__ import annotations

import logging
from typing import Any, NamedTuple

import cv2
import numpy as np

from common.errors import UserError
from datamodules.sample_bank import (
    GROUPS,
    SampleBank,
)
from models.montage_canvas import POSITION_GROUPS, POSITIONS, MontageLayout

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
