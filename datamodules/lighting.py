"""AlexNet-style PCA lighting noise (Krizhevsky et al. 2012), as used by the Bag of Tricks baseline
(He et al., CVPR 2019, Sec. 2.1): every pixel of an image gets the same RGB offset

    offset = eigvec @ (alpha * eigval),   alpha ~ N(0, alpha_std) per image (3 values),

with the eigen-decomposition of the RGB covariance of ImageNet pixels on the 0-255 scale. Neither timm
nor torchvision ships it, so it is written here in torchvision's v2 style (`Lighting`, a
`torchvision.transforms.v2.Transform`) with a functional core (`adjust_lighting`) that also takes a
batch with one alpha per image.

Pixel scale follows torchvision's convention: uint8 images are 0-255 (the result is rounded and
clamped back to uint8); float images are taken as 0-1, so the offset is divided by 255.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

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


def adjust_lighting(
    image: torch.Tensor,
    alpha: torch.Tensor,
    eigval: torch.Tensor | None = None,
    eigvec: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the PCA lighting offset for `alpha` to `image`.

    image: (..., 3, H, W) uint8 (0-255) or float (0-1); alpha: (3,) or (..., 3) matching the leading
    dimensions of `image` (one alpha per image of a batch)."""
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"PCA lighting needs RGB images (..., 3, H, W), got shape {tuple(image.shape)}")
    eigval = torch.as_tensor(IMAGENET_EIGVAL if eigval is None else eigval, dtype=torch.float32, device=image.device)
    eigvec = torch.as_tensor(IMAGENET_EIGVEC if eigvec is None else eigvec, dtype=torch.float32, device=image.device)
    offset = lighting_offset(alpha.to(device=image.device, dtype=torch.float32), eigval, eigvec)
    offset = offset[..., :, None, None]  # broadcast over H, W
    if image.dtype == torch.uint8:
        return (image.float() + offset).round_().clamp_(0, 255).to(torch.uint8)
    if not image.is_floating_point():
        raise TypeError(f"PCA lighting: unsupported image dtype {image.dtype}")
    return image + (offset / 255.0).to(image.dtype)


class Lighting(v2.Transform):
    """Random PCA lighting noise, a torchvision v2 transform.

    Draws alpha ~ N(0, alpha_std) (three values per image; for a batched tensor (B, 3, H, W) one set per
    image) and adds `eigvec @ (alpha * eigval)` to every pixel. Defaults: the ImageNet eigen-decomposition
    and alpha_std 0.1 of the Bag of Tricks. Tensors and `tv_tensors.Image` are transformed; other inputs
    (labels, boxes) pass through. `generator` makes the draws reproducible.
    """

    def __init__(
        self,
        alpha_std: float = 0.1,
        eigval: tuple[float, ...] = IMAGENET_EIGVAL,
        eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if alpha_std < 0:
            raise ValueError(f"alpha_std must be >= 0, got {alpha_std}")
        self.alpha_std = float(alpha_std)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise ValueError("eigval must have 3 values and eigvec be 3x3")
        self.generator = generator

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        images = [x for x in flat_inputs if isinstance(x, torch.Tensor) and x.ndim >= 3
                  and not isinstance(x, (tv_tensors.BoundingBoxes, tv_tensors.Mask))]
        batch = tuple(images[0].shape[:-3]) if images else ()
        alpha = torch.randn((*batch, 3), generator=self.generator) * self.alpha_std
        return {"alpha": alpha}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask)):
            return inpt
        if not isinstance(inpt, torch.Tensor):
            raise TypeError(f"Lighting works on tensors; convert {type(inpt).__name__} with v2.PILToTensor() first")
        out = adjust_lighting(inpt.as_subclass(torch.Tensor), params["alpha"], self.eigval, self.eigvec)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def extra_repr(self) -> str:
        return f"alpha_std={self.alpha_std}"
