"""Stable import path of the pixel-wise contrastive losses (implementation: ``models/pixel_contrastive.py``).

- ``within_image_loss(feats, feats_distorted, labels, *, temperature=0.07, ignore_index=255,
  formulation="paper"|"official", chunk_size=None)``
- ``cross_image_loss(feats, feats_distorted, labels, feats_other, labels_other, *, same keywords)``
- ``batch_loss(feats, feats_distorted, labels, *, same keywords)``

Optional keywords of all three: ``max_pixels`` (per-image cap), ``sampling`` ("random" | "balanced"),
``generator``.
"""

from models.pixel_contrastive import (  # noqa: F401
    FORMULATIONS,
    IGNORE_INDEX,
    LOSSES,
    batch_loss,
    cross_image_loss,
    downsample_labels,
    gather_with_grad,
    partner_views,
    pixel_contrastive_loss,
    sample_pixels,
    within_image_loss,
)

__all__ = [
    "FORMULATIONS", "IGNORE_INDEX", "LOSSES", "batch_loss", "cross_image_loss", "downsample_labels",
    "gather_with_grad", "partner_views", "pixel_contrastive_loss", "sample_pixels", "within_image_loss",
]
