"""Preset montage layout: four cells around a split point (Zhou et al., ECCV 2020, Sec. 3.2).

The canvas is cut at (split_x, split_y):

    +-----------+------------------+
    | top_left  |    top_right     |   top_left: smaller square (S) sample
    |   (S)     |       (W)        |   top_right: wide (W) sample
    +-----------+------------------+
    |bottom_left|   bottom_right   |   bottom_left: tall (T) sample
    |   (T)     |       (S)        |   bottom_right: larger square (S) sample
    +-----------+------------------+

The paper gives neither canvas size nor split; 224 and a split at 0.4 of each side are our defaults
(T cell aspect 0.67, W cell 1.5, i.e. at the S/T and S/W group boundaries' side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.erf import position_regions_from_masks

POSITIONS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
POSITION_GROUPS: dict[str, str] = {
    "top_left": "S",
    "top_right": "W",
    "bottom_left": "T",
    "bottom_right": "S",
}


@dataclass(frozen=True)
class MontageLayout:
    """Canvas size (H, W) and the split point as fractions (split_x, split_y) of the canvas."""

    canvas: tuple[int, int] = (224, 224)
    split: tuple[float, float] = (0.4, 0.4)

    def __post_init__(self) -> None:
        for frac in self.split:
            if not 0.0 < frac < 1.0:
                raise ValueError(f"montage split fractions must lie in (0, 1), got {self.split}")

    @property
    def split_px(self) -> tuple[int, int]:
        """Split point in pixels (x, y)."""
        h, w = self.canvas
        return round(self.split[0] * w), round(self.split[1] * h)

    def cell_boxes(self) -> dict[str, tuple[int, int, int, int]]:
        """Each cell as (x, y, w, h) in canvas pixels, in POSITIONS order."""
        h, w = self.canvas
        sx, sy = self.split_px
        return {
            "top_left": (0, 0, sx, sy),
            "top_right": (sx, 0, w - sx, sy),
            "bottom_left": (0, sy, sx, h - sy),
            "bottom_right": (sx, sy, w - sx, h - sy),
        }

    def region_masks(self) -> torch.Tensor:
        """Binary masks (4, H, W) of the cells in POSITIONS order."""
        h, w = self.canvas
        masks = torch.zeros(len(POSITIONS), h, w)
        for i, pos in enumerate(POSITIONS):
            x, y, cw, ch = self.cell_boxes()[pos]
            masks[i, y : y + ch, x : x + cw] = 1.0
        return masks

    def region_areas(self) -> torch.Tensor:
        """Area fraction of each cell (sums to 1), in POSITIONS order."""
        h, w = self.canvas
        return torch.tensor([bw * bh / (h * w) for (_, _, bw, bh) in self.cell_boxes().values()])

    def position_regions(self, feature_hw: tuple[int, int]) -> torch.Tensor:
        """Region index (h, w) of each feature position, in POSITIONS order: the cell holding the input-space
        centre of the position's stride cell (``models.erf.position_regions_from_masks`` on the cell masks)."""
        return position_regions_from_masks(self.region_masks(), feature_hw)
