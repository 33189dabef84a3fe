"""Semantic segmentation on a timm backbone: torchvision's DeepLabV3 head (ASPP) on the backbone's last
feature map. Free of Lightning.

Dilated last stages: create the backbone with ``output_stride=16`` (or 8) in
``model.backbone_kwargs`` (timm replaces the strides of the last stages by dilation; the weights and
their keys are unchanged, so a pre-trained backbone still loads strictly). DeepLabV3 (Chen et al. 2017)
uses output stride 16 for training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3

# torchvision's DeepLabHead: ASPP with rates 12/24/36 and 256 channels
DEFAULT_ATROUS_RATES = (12, 24, 36)
DEFAULT_DECODER_CHANNELS = 256


class FeatureMapAsDict(nn.Module):
    """Wraps a backbone returning a (B, C, h, w) map so that it returns ``{"out": map}`` (DeepLabV3's contract)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(out=self.body(x))


class DeepLabDecoder(nn.Sequential):
    """torchvision ``DeepLabHead`` without its final classifier: ASPP(rates) -> 3x3 conv -> BN -> ReLU, with
    the channel count as a parameter (``DeepLabHead`` fixes 256). Keys ``0.*`` ASPP, ``1.*`` conv, ``2.*`` BN."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int] = DEFAULT_ATROUS_RATES,
                 out_channels: int = DEFAULT_DECODER_CHANNELS) -> None:
        super().__init__(
            ASPP(in_channels, list(atrous_rates), out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.out_channels = out_channels


def deeplab_head(in_channels: int, num_classes: int, atrous_rates: Sequence[int] = DEFAULT_ATROUS_RATES,
                 channels: int = DEFAULT_DECODER_CHANNELS) -> nn.Sequential:
    """``DeepLabDecoder`` + 1x1 classifier (key ``4.*``): torchvision's ``DeepLabHead`` (same modules, keys
    and forward) when rates and channels are the defaults."""
    return nn.Sequential(*DeepLabDecoder(in_channels, atrous_rates, channels),
                         nn.Conv2d(channels, num_classes, 1))


def build_deeplabv3(backbone: nn.Module, num_classes: int, atrous_rates: Sequence[int] = DEFAULT_ATROUS_RATES,
                    channels: int = DEFAULT_DECODER_CHANNELS) -> DeepLabV3:
    """DeepLabV3 with an ASPP head over `backbone.num_features` channels; its forward returns
    ``{"out": logits}`` upsampled (bilinear) to the input size."""
    return DeepLabV3(FeatureMapAsDict(backbone), deeplab_head(int(backbone.num_features), num_classes,
                                                              atrous_rates, channels))
