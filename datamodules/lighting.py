"""AlexNet-style PCA lighting noise (Krizhevsky et al. 2012), as used by the Bag of Tricks baseline
(He et al., CVPR 2019, Sec. 2.1): every pixel of an image gets the same RGB offset

    offset = eigvec @ (alpha * eigval),   alpha ~ N(0, alpha_std) per image (3 values),

with the eigen-decomposition of the RGB covariance of ImageNet pixels on the 0-255 scale. Neither timm
nor torchvision ships it; the supervised pre-training's batch augmentation
(``datamodules.classification_pretrain.TrainTransform``) adds it to a whole batch, one alpha per image.
"""

from __future__ import annotations

import torch

# Eigen-decomposition of ImageNet's RGB pixel covariance (0-255 scale), as in the Bag of Tricks / GluonCV.
IMAGENET_EIGVAL: tuple[float, float, float] = (55.46, 4.794, 1.148)
IMAGENET_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def lighting_offset(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor) -> torch.Tensor:
    """(..., 3) alphas -> (..., 3) RGB offsets on the 0-255 scale: eigvec @ (alpha * eigval)."""
    return (alpha * eigval) @ eigvec.T
