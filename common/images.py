"""Image utilities of every floor, in one place: the ImageNet mean/std (timm's), normalisation and its
inverse, conversion to uint8 pictures, the colour palette and the drawing helpers of the logged and
previewed images (boxes, masks, montages, ERF maps).

The normalisations compute ``(x / 255 - mean) / std`` in different ways on purpose; each keeps its
exact numbers:

- ``normalize``: uint8 (0..255) or float (0..1) batch, float32 arithmetic (fine-tuning, contrastive);
- ``normalize_255``: float batch on the 0-255 scale, ``(x - 255 mean) / (255 std)`` (supervised);
- ``normalize_images``: uint8 montage batch on the training device (table look-up on the CPU, one fused
  ``addcmul`` on an accelerator, constants computed in float64);
- ``normalize_uint8``: HxWx3 uint8 images straight into a float32 NCHW batch (table look-up, FCMAE).

``denormalize`` inverts ``normalize_images`` exactly for uint8 inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- normalisation
def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) RGB batch (B, 3, H, W) -> ImageNet-normalised float32, in the
    channels-last memory format if ``channels_last``."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def normalize_255(x: torch.Tensor) -> torch.Tensor:
    """0-255 float RGB -> ImageNet-normalised."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x - mean) / std


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
# uint8 value -> normalised float32, one 256-entry table per channel: (v / 255 - mean) / std
_LUTS = [
    ((np.arange(256, dtype=np.float64) / 255.0 - m) / s).astype(np.float32).reshape(1, 256)
    for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)
]
_LUT_HWC = np.ascontiguousarray(np.stack([t[0] for t in _LUTS], axis=-1).reshape(1, 256, 3))  # 3-channel table
_AFFINE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (1/(255 std), -mean/std)


def normalize_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB, any memory layout, on any device -> (B, 3, H, W) float32
    ``(x / 255 - mean) / std`` with the ImageNet mean/std, in the channels-last memory format if
    ``channels_last`` else contiguous (NCHW). The one normalisation of montage batches: the LightningModule
    applies it on the device after the transfer (``on_after_batch_transfer``), ``erf_images`` before
    returning.

    On an accelerator: the memory format is fixed on the uint8 tensor (a quarter of the bytes), then one
    cast and one fused ``addcmul`` (``x * 1/(255 std) + (-mean/std)``). On the CPU, where those torch
    kernels ran about 3x slower than a table look-up on one core, OpenCV's ``cv2.LUT`` maps each image
    through per-channel float tables (the same values, computed in float64 once)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    if images.device.type == "cpu":
        hwc = images.permute(0, 2, 3, 1)  # a view; a plain copy per image if the input is NCHW
        if not channels_last:
            return normalize_uint8(hwc)
        b, h, w, _ = hwc.shape
        result = new_batch_tensor((b, h, w, 3), torch.float32)
        out = result.numpy()
        for i in range(b):
            cv2.LUT(np.ascontiguousarray(hwc[i].numpy()), _LUT_HWC, dst=out[i])
        return result.permute(0, 3, 1, 2)
    return _normalize_affine(images, channels_last)


def _normalize_affine(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The accelerator path of ``normalize_images`` (plain torch ops, so it runs, and is tested, on any
    device): memory format on the uint8 tensor, then ``x * 1/(255 std) + (-mean/std)``."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if images.device not in _AFFINE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        _AFFINE[images.device] = ((1.0 / (255.0 * std)).float().to(images.device),
                                  (-mean / std).float().to(images.device))
    scale, shift = _AFFINE[images.device]
    x = images.contiguous(memory_format=fmt).float()
    return torch.addcmul(shift, x, scale).contiguous(memory_format=fmt)


def normalize_uint8(images: torch.Tensor | Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB (a tensor, or a sequence of HxWx3 arrays/tensors) -> (B, 3, H, W) float32
    contiguous, ``(x / 255 - mean) / std`` with the ImageNet mean/std.

    Per image: ``cv2.split`` into planes, then ``cv2.LUT`` through a per-channel float table straight
    into the output plane -- one pass over the pixels, and about 2x faster on one core than torch's
    strided HWC -> CHW float copy followed by the arithmetic."""
    first = images[0]
    h, w = first.shape[:2]
    result = new_batch_tensor((len(images), 3, h, w), torch.float32)
    out = result.numpy()
    for i, img in enumerate(images):
        arr = img.numpy() if isinstance(img, torch.Tensor) else img
        if arr.dtype != np.uint8 or arr.shape != (h, w, 3):
            raise ValueError(f"expected ({h}, {w}, 3) uint8 images, got {arr.shape} {arr.dtype}")
        for c, plane in enumerate(cv2.split(np.ascontiguousarray(arr))):
            cv2.LUT(plane, _LUTS[c], dst=out[i, c])
    return result


def new_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor. Inside a DataLoader worker it is allocated in shared memory
    directly (as ``default_collate`` does), which saves copying the batch there when it is sent;
    elsewhere by numpy, whose large allocations ask for transparent huge pages (page-faulting a
    38 MB batch in measured 2-3x faster than ``torch.empty``)."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device=proto.device)
            return proto.new(storage).resize_(shape)
        except (AttributeError, RuntimeError):  # private API moved: fall back to a plain tensor
            pass
    return torch.from_numpy(np.empty(shape, torch.empty(0, dtype=dtype).numpy().dtype))


def denormalize(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised float -> (B, H, W, 3) uint8 (for pictures); uint8 images (a batch not yet
    normalised) are passed through, only moved to the CPU and to HWC."""
    if images.dtype == torch.uint8:
        return images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    x = images.detach().cpu().float() * _STD + _MEAN
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) uint8 or float in [0, 1] -> (..., H, W, 3) uint8 array (C-contiguous)."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().byte()
    return np.ascontiguousarray(image.movedim(-3, -1).cpu().numpy())


# ------------------------------------------------------------------------------------------- drawing
def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (golden-ratio hues), fixed for a given n."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 255)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


# Fixed colours of the dataset previews (tools.embedded.write_preview): instance k, or class k + 1.
PREVIEW_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
], np.uint8)


def colorize_labels(label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """A label map as RGB: 0 black, class k (1..num_classes) the preview colour ``PREVIEW_PALETTE[k - 1]``
    (cycled), ``ignore_index`` white."""
    out = np.zeros((*label.shape, 3), np.uint8)
    for k in range(1, num_classes + 1):
        out[label == k] = PREVIEW_PALETTE[(k - 1) % len(PREVIEW_PALETTE)]
    out[label == ignore_index] = 255
    return out


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None,
                    names: list[str], masks: np.ndarray | None = None) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) with 'name score' tags, and translucent instance masks, on a copy of `image`."""
    out = image.copy()
    colours = palette(max(len(names), 1))
    if masks is not None and len(masks):
        overlay = out.astype(np.float32)
        for m, lab in zip(masks.astype(bool), labels):
            overlay[m] = 0.5 * overlay[m] + 0.5 * colours[int(lab) % len(colours)]
        out = overlay.round().astype(np.uint8)
    for i, (box, lab) in enumerate(zip(boxes, labels)):
        c = tuple(int(v) for v in colours[int(lab) % len(colours)])
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), c, 1)
        tag = names[int(lab)] if int(lab) < len(names) else str(int(lab))
        if scores is not None:
            tag += f" {float(scores[i]):.2f}"
        cv2.putText(out, tag, (x0, max(y0 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, c, 1, cv2.LINE_AA)
    return out


def overlay_labels(image: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255,
                   alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over `image` (class 0 = background left uncoloured; ignore pixels grey)."""
    colours = np.concatenate([palette(num_classes), np.full((256 - num_classes, 3), 128, np.uint8)])
    colours[0] = 0
    tint = colours[label.astype(np.int64).clip(0, 255)].astype(np.float32)
    weight = np.where((label > 0)[..., None], alpha, 0.0)
    weight = np.where((label == ignore_index)[..., None], 0.3, weight)
    return (image.astype(np.float32) * (1 - weight) + tint * weight).round().astype(np.uint8)


class CellLayout(Protocol):
    """What the montage drawings need of a layout (``models.montage_canvas.MontageLayout``)."""

    def cell_boxes(self) -> Mapping[str, tuple[int, int, int, int]]: ...


def draw_cell_borders(image: np.ndarray, layout: CellLayout,
                      colour: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """A copy of the montage with the preset cell borders drawn (1 px)."""
    out = image.copy()
    for x, y, w, h in layout.cell_boxes().values():
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 1)
    return out


POSITION_COLOURS = {  # RGB, per montage cell position (models.montage_canvas.POSITIONS)
    "top_left": (255, 64, 64),
    "top_right": (64, 200, 255),
    "bottom_left": (255, 220, 0),
    "bottom_right": (80, 255, 80),
}


def annotate_montage(canvas: np.ndarray, cells: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                     layout: CellLayout | None = None) -> np.ndarray:
    """A copy of ``canvas`` (enlarged 2x, nearest, when small so the text is legible) with the preset
    cells (thin grey), each sample's ``cell_box`` (coloured per position) and "group: class" drawn."""
    k = 2 if max(canvas.shape[:2]) < 400 else 1
    img = np.ascontiguousarray(np.repeat(np.repeat(canvas, k, axis=0), k, axis=1))
    if layout is not None:
        for x, y, w, h in layout.cell_boxes().values():
            cv2.rectangle(img, (x * k, y * k), ((x + w) * k - 1, (y + h) * k - 1), (128, 128, 128), 1)
    for cell in cells:
        x, y, w, h = cell["cell_box"]
        colour = POSITION_COLOURS[cell["position"]]
        cv2.rectangle(img, (x * k, y * k), ((x + w) * k - 1, (y + h) * k - 1), colour, 2)
        name = class_names[cell["label"]] if 0 <= cell["label"] < len(class_names) else str(cell["label"])
        text = f"{cell['group']}: {name}" + (" (flip)" if cell["flip"] else "")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        tx, ty = x * k + 3, y * k + 3
        cv2.rectangle(img, (tx - 2, ty - 2), (tx + tw + 2, ty + th + base), (0, 0, 0), -1)
        cv2.putText(img, text, (tx, ty + th), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return img


def erf_heatmap_grid(
    erf: torch.Tensor,
    positions: Sequence[tuple[int, int]] | None = None,
    *,
    region_masks: torch.Tensor | None = None,
    cmap: str = "inferno",
    gap: int = 2,
) -> np.ndarray:
    """RGB uint8 image (for logging) tiling the ERFs (h, w, H, W) of a few positions, each normalised to
    its own max and colour-mapped with matplotlib (no pyplot, no window). Default positions: the 4
    corners and the centre of the feature map. With ``region_masks`` (R, H, W), region borders are drawn
    in white."""
    import matplotlib  # lazy: only needed for logging

    fh, fw = erf.shape[:2]
    if positions is None:
        positions = [(0, 0), (0, fw - 1), (fh // 2, fw // 2), (fh - 1, 0), (fh - 1, fw - 1)]
        positions = list(dict.fromkeys(positions))
    colormap: Callable[[np.ndarray], np.ndarray] = matplotlib.colormaps[cmap]
    border = None
    if region_masks is not None:
        lab = region_masks.detach().cpu().float().argmax(0)
        border = torch.zeros_like(lab, dtype=torch.bool)
        border[1:] |= lab[1:] != lab[:-1]
        border[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        border = border.numpy()
    tiles = []
    for j, k in positions:
        g = erf[j, k].detach().cpu().double()
        g = (g / g.max()).numpy() if g.max() > 0 else g.numpy()
        rgb = (colormap(g)[..., :3] * 255).round().astype(np.uint8)
        if border is not None:
            rgb[border] = 255
        tiles.append(rgb)
    big_h, big_w = tiles[0].shape[:2]
    grid = np.zeros((big_h, len(tiles) * (big_w + gap) - gap, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        grid[:, i * (big_w + gap) : i * (big_w + gap) + big_w] = tile
    return grid
