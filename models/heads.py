"""Classification heads on a backbone's final feature map."""

from __future__ import annotations

from torch import Tensor, nn


class DenseClassifier(nn.Module):
    """1x1 conv giving class logits (B, K, h, w) at every feature position (Zhou et al., ECCV 2020, the
    FC layer replaced by a 1x1 conv). K = C object classes + 1 background (index C).

    Shared by all three Montage objectives: the map is linear, so average-pooling its logits equals
    classifying the pooled features (global and block-wise objectives pool the dense logits).
    """

    def __init__(self, in_channels: int, num_classes: int, *, init_std: float = 0.01) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"DenseClassifier needs in_channels >= 1 and num_classes >= 2 (objects + background), "
                f"got {in_channels}, {num_classes}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=init_std)
        nn.init.zeros_(self.conv.bias)

    @property
    def background_index(self) -> int:
        """Index of the background class (the last one)."""
        return self.num_classes - 1

    def forward(self, features: Tensor) -> Tensor:
        """(B, in_channels, h, w) features -> (B, num_classes, h, w) logits."""
        return self.conv(features)
