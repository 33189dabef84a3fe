"""Backbones: any timm model by name, returning the final feature map (before global pooling)."""

from __future__ import annotations

import timm
from torch import nn

from common.errors import UserError


def create_backbone(arch: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """A timm model with its classifier removed (`num_classes=0, global_pool=''`), so
    `model(x)` returns the (B, C, h, w) feature map and `model.num_features` is C.

    Its state_dict keys are timm's own: `timm.create_model(arch, num_classes=0)` loads it strictly.
    """
    if pretrained:
        raise UserError(
            f"pretrained weights for '{arch}' would be downloaded from the Hugging Face hub, and this "
            "machine has no internet; pre-train with this project or pass a local file with --backbone"
        )
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:10]
        raise UserError(f"unknown timm architecture '{arch}'" + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", **kwargs)
