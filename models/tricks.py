"""Bag of Tricks model surgery (He et al., CVPR 2019), applied to a timm backbone before training.

- `xavier_init`: the paper's init (Sec. 2.1), ``model.init: xavier``.
- `set_zero_gamma` / `last_block_norms`: zero-gamma (Sec. 3.1), ``model.zero_gamma``.
- `stride_on_first_1x1`: the original ResNet ("ResNet-A", stride on the first 1x1 conv) from timm's
  ResNet-B, ``model.stride_on_1x1``. ResNet-B/C/D themselves are timm models and backbone kwargs
  (``resnet50``; ``stem_type: deep, stem_width: 32``; ``avg_down: true``; lightning_modules/supervised.py).
- `build_backbone`: the backbone a supervised run's ``model`` config describes (arch, kwargs, ResNet-A).

Pure model code: no Lightning, used by `lightning_modules.supervised` and `models.distillation.load_teacher`.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from common.errors import UserError
from models.backbones import create_backbone


def xavier_init(module: nn.Module) -> None:
    """Paper Sec. 2.1: conv and FC weights Xavier-uniform (a = sqrt(6 / (d_in + d_out))), biases 0,
    BN gamma 1 and beta 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def last_block_norms(backbone: nn.Module) -> list[nn.Module]:
    """The last BatchNorm of the residual branch of every residual block (timm blocks expose
    ``zero_init_last``): bn2 of a BasicBlock, bn3 of a Bottleneck."""
    norms = []
    for block in backbone.modules():
        if block is backbone or not callable(getattr(block, "zero_init_last", None)):
            continue
        branch = [m for n, m in block.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not n.startswith("downsample")]
        if branch:
            norms.append(branch[-1])
    return norms


def set_zero_gamma(backbone: nn.Module, enabled: bool) -> int:
    """Zero-gamma (paper Sec. 3.1): gamma of each residual block's last BN to 0 (enabled) or 1. Returns
    the number of blocks."""
    norms = last_block_norms(backbone)
    if enabled and not norms:
        raise UserError("model.zero_gamma: this architecture has no residual blocks with a last BatchNorm")
    with torch.no_grad():
        for bn in norms:
            bn.weight.fill_(0.0 if enabled else 1.0)
    return len(norms)


def stride_on_first_1x1(backbone: nn.Module) -> int:
    """Turn a timm ResNet-B bottleneck network into the original ResNet ("ResNet-A"): in every
    downsampling bottleneck the stride moves from the 3x3 conv (conv2) to the first 1x1 conv (conv1).
    Returns the number of blocks changed."""
    from timm.models.resnet import Bottleneck

    changed = 0
    for m in backbone.modules():
        if isinstance(m, Bottleneck) and m.conv2.stride != (1, 1):
            if not isinstance(m.aa, nn.Identity):
                raise UserError("model.stride_on_1x1 does not combine with anti-aliased downsampling")
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
            changed += 1
    if not changed:
        raise UserError("model.stride_on_1x1 needs a timm ResNet with Bottleneck blocks (e.g. resnet50)")
    return changed


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    backbone = create_backbone(str(model_cfg.arch), **dict(model_cfg.get("backbone_kwargs", {}) or {}))
    if model_cfg.get("stride_on_1x1", False):
        stride_on_first_1x1(backbone)
    return backbone
