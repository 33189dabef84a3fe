"""Image utilities of every floor, in one place: the ImageNet mean/std (timm's), normalisation and its
inverse, conversion to uint8 pictures.

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

from collections.abc import Sequence

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

