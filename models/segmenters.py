"""Semantic segmentation on a timm backbone: torchvision's DeepLabV3 head (ASPP) on the backbone's last
feature map. Free of Lightning.

Dilated last stages: create the backbone with ``output_stride=16`` (or 8) in
``model.backbone_kwargs`` (timm replaces the strides of the last stages by dilation; the weights and
their keys are unchanged, so a pre-trained backbone still loads strictly). DeepLabV3 (Chen et al. 2017)
uses output stride 16 for training.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3


class FeatureMapAsDict(nn.Module):
    """Wraps a backbone returning a (B, C, h, w) map so that it returns ``{"out": map}`` (DeepLabV3's contract)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(out=self.body(x))


def build_deeplabv3(backbone: nn.Module, num_classes: int) -> DeepLabV3:
    """DeepLabV3 with an ASPP head (rates 12, 24, 36) over `backbone.num_features` channels; its forward
    returns ``{"out": logits}`` upsampled (bilinear) to the input size."""
    return DeepLabV3(FeatureMapAsDict(backbone), DeepLabHead(int(backbone.num_features), num_classes))
