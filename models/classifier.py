"""A whole-image classifier: backbone feature map -> global average pool -> dropout -> linear."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone (feature map) -> global average pool -> dropout -> linear."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(backbone.num_features), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        f = f.mean(dim=(2, 3)) if f.ndim == 4 else f
        return self.head(self.dropout(f))
