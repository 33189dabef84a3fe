"""One image-logging helper for every method: W&B images when a WandbLogger is attached, and always
PNG files under `<run>/images/<key>/` so a person without W&B can look at them. Rank 0 only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image


@rank_zero_only
def log_images(
    trainer: L.Trainer,
    key: str,
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
) -> list[Path]:
    """Log HxWx3 uint8 images under `key` at the current global step; returns the PNG paths written."""
    step = int(trainer.global_step)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=list(images), caption=list(captions) if captions else None, step=step)
    out_dir = Path(trainer.default_root_dir) / "images" / key.replace("/", "_")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"step{step:07d}_{i:02d}.png"
        Image.fromarray(np.ascontiguousarray(image)).save(path)
        paths.append(path)
    return paths
