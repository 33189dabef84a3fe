"""The network of label-based pixel contrastive pre-training (Zhao et al., ICCV 2021): a DeepLabV3-style
model without its classifier (timm backbone, dilated with ``output_stride``, + torchvision's ASPP and the
3x3 conv/BN/ReLU that follow it in ``DeepLabHead``), features resized (bilinear) to the loss resolution,
then a projection head of 1x1 convs with unit-normalised output. Free of Lightning.

The decoder is ``models.segmenters.DeepLabDecoder``: the head of the fine-tuning DeepLabV3 without its
last 1x1 classifier, so its weights seed that head (same keys ``0.*`` ASPP, ``1.*`` conv, ``2.*`` BN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.segmenters import DeepLabDecoder


class ProjectionHead(nn.Sequential):
    """``layers`` 1x1 convs with ``dim`` channels, ReLU after all but the last (paper: 3 x 256), then L2
    normalisation over channels at every pixel. ``norm=True`` adds BatchNorm before each ReLU (the
    published TF code's projection head uses batch norm)."""

    def __init__(self, in_channels: int, dim: int = 256, layers: int = 3, norm: bool = False) -> None:
        if layers < 1:
            raise ValueError(f"projection head needs at least one layer, got {layers}")
        mods: list[nn.Module] = []
        c = in_channels
        for i in range(layers):
            last = i == layers - 1
            mods.append(nn.Conv2d(c, dim, 1, bias=last or not norm))
            if not last:
                if norm:
                    mods.append(nn.BatchNorm2d(dim))
                mods.append(nn.ReLU(inplace=True))
            c = dim
        super().__init__(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), dim=1)


class PixelEmbedder(nn.Module):
    """On a backbone's feature map: DeepLab decoder (optional) -> bilinear resize to the loss resolution ->
    projection head. ``forward(features, size)`` returns unit features (B, dim, *size). The backbone stays
    outside (the LightningModule owns it, so it is saved and exported once)."""

    def __init__(self, in_channels: int, *, use_aspp: bool = True, atrous_rates: Sequence[int] = (12, 24, 36),
                 decoder_channels: int = 256, proj_dim: int = 256, proj_layers: int = 3,
                 proj_norm: bool = False) -> None:
        super().__init__()
        self.decoder = DeepLabDecoder(in_channels, atrous_rates, decoder_channels) if use_aspp else nn.Identity()
        self.head = ProjectionHead(decoder_channels if use_aspp else in_channels, proj_dim, proj_layers, proj_norm)

    def forward(self, features: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        y = self.decoder(features)
        if size is not None and tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return self.head(y)
