"""Small numpy / OpenCV image helpers shared by the dataset builder and the batch makers.

Images are HxWx3 uint8 RGB unless said otherwise; randomness comes from an explicit
``numpy.random.Generator`` so that callers stay deterministic under a seed.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize with area averaging when shrinking (no aliasing) and bilinear when enlarging."""
    h, w = image.shape[:2]
    shrink = width * height < w * h
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.4,
    hue: float = 0.03,
) -> np.ndarray:
    """torchvision-style ColorJitter on a uint8 RGB array: each factor drawn uniformly in [1-x, 1+x],
    hue shifted by up to ``hue`` of a full turn. Returns a new uint8 array."""
    b = rng.uniform(1 - brightness, 1 + brightness)
    c = rng.uniform(1 - contrast, 1 + contrast)
    s = rng.uniform(1 - saturation, 1 + saturation)
    h = rng.uniform(-hue, hue)
    img = image.astype(np.float32) * b
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = (img - gray.mean()) * c + gray.mean()
    gray = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    img = np.clip((img - gray) * s + gray, 0, 255).astype(np.uint8)
    if abs(h) > 1e-4:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # uint8 hue is 0..179
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + round(h * 180)) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return img


def random_crop_resize(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crop a random window (side = scale * the image's short side, aspect ``ratio``) and resize it to
    ``size`` x ``size``."""
    h, w = image.shape[:2]
    side = rng.uniform(*scale) * min(h, w)
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(min(w, max(8, round(side * np.sqrt(r)))))
    ch = int(min(h, max(8, round(side / np.sqrt(r)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return resize(image[y0:y0 + ch, x0:x0 + cw], size, size)
