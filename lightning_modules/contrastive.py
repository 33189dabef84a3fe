"""Label-based pixel contrastive pre-training (Zhao et al., "Contrastive Learning for Label-Efficient
Semantic Segmentation", ICCV 2021) as a LightningModule.

I and its distorted copy I^ go through the backbone (timm, dilated with ``model.backbone_kwargs.
output_stride``) in one batch, then the DeepLab decoder (ASPP + 3x3 conv/BN/ReLU, no classifier), a
bilinear resize to ``image / model.loss_stride`` and the projection head (3 x 1x1 conv, 256, unit
norm). Labels are downsampled (nearest) to that resolution; the loss (``model.loss``: within | cross |
batch, ``model.formulation``: paper | official) comes from ``models.pixel_contrastive``. Cross-image
partners J are drawn from the *global* batch (``partner_views``: gathered over ranks with gradients).

Stage 2 drops only the projection head: ``finetune.py --task segmentation --backbone <run>`` loads the
exported ``backbone.pt`` (timm key layout) and ``decoder.pt`` beside it (torchvision ``DeepLabHead`` key
layout without the final classifier ``4.*``) into its DeepLabV3, whose new 1x1 classifier starts random
(``model.pretrained_decoder=false``: the whole head starts random).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from callbacks.image_logging import log_images
from common.errors import UserError
from common.images import overlay_labels, to_uint8_image
from datamodules.distorted import DistortedBatch
from lightning_modules.base import PretrainModule
from models.export import DECODER_FILE
from models.pixel_contrastive import (
    FORMULATIONS,
    IGNORE_INDEX,
    LOSSES,
    SAMPLING,
    downsample_labels,
    partner_shift,
    partner_views,
    pixel_contrastive_loss,
)
from models.projection import PixelEmbedder


def check_model_config(m: DictConfig) -> None:
    """Clear errors for the contrastive keys of the config, before anything is built."""
    if m.loss not in LOSSES:
        raise UserError(f"model.loss must be one of {', '.join(LOSSES)}, got '{m.loss}'")
    if m.formulation not in FORMULATIONS:
        raise UserError(f"model.formulation must be one of {', '.join(FORMULATIONS)}, got '{m.formulation}'")
    if m.sampling not in SAMPLING:
        raise UserError(f"model.sampling must be one of {', '.join(SAMPLING)}, got '{m.sampling}'")
    if float(m.temperature) <= 0:
        raise UserError(f"model.temperature must be > 0, got {m.temperature}")
    if int(m.loss_stride) < 1:
        raise UserError(f"model.loss_stride must be >= 1, got {m.loss_stride}")
    if m.chunk_size is not None and int(m.chunk_size) < 1:
        raise UserError(f"model.chunk_size must be >= 1 or null, got {m.chunk_size}")
    if m.max_pixels is not None and int(m.max_pixels) < 1:
        raise UserError(f"model.max_pixels must be >= 1 or null, got {m.max_pixels}")


class ContrastiveModule(PretrainModule):
    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__(cfg)
        m = self.cfg.model
        check_model_config(m)
        self.embed = PixelEmbedder(int(self.backbone.num_features), use_aspp=bool(m.aspp),
                                   atrous_rates=tuple(int(r) for r in m.atrous_rates),
                                   decoder_channels=int(m.decoder_channels), proj_dim=int(m.proj_dim),
                                   proj_layers=int(m.proj_layers), proj_norm=bool(m.proj_norm))

    def loss_kwargs(self) -> dict[str, Any]:
        m = self.cfg.model
        return dict(temperature=float(m.temperature), ignore_index=IGNORE_INDEX, formulation=str(m.formulation),
                    chunk_size=None if m.chunk_size is None else int(m.chunk_size),
                    max_pixels=None if m.max_pixels is None else int(m.max_pixels), sampling=str(m.sampling))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or float images -> (B, proj_dim, H / loss_stride, W / loss_stride) unit features."""
        s = int(self.cfg.model.loss_stride)
        size = (max(1, images.shape[-2] // s), max(1, images.shape[-1] // s))
        return self.embed(self.backbone(self.normalize(images)), size)

    def compute_losses(self, batch: DistortedBatch) -> dict[str, torch.Tensor]:
        b = batch.images.shape[0]
        z = self(torch.cat([batch.images, batch.distorted]))  # one pass: shared BN statistics over both views
        f, fd = z[:b], z[b:]
        labels = downsample_labels(batch.labels, tuple(f.shape[-2:]))
        kw = self.loss_kwargs()
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        seed = int(self.cfg.seed)
        if kw["max_pixels"] is not None:
            kw["generator"] = torch.Generator().manual_seed((seed * 1_000_003 + int(self.global_step)) * 1009 + rank)
        kind = str(self.cfg.model.loss)
        fo = lo = None
        if kind == "cross":  # each image against another one's distorted view
            fo, lo = partner_views(fd, labels, partner_shift(b * world, int(self.global_step), seed))
        loss = pixel_contrastive_loss(kind, f, fd, labels, fo, lo, **kw)
        self._maybe_log_images(batch, labels)
        valid = (labels != IGNORE_INDEX).float().mean()
        return {"loss": loss, f"loss_{kind}": loss.detach(), "valid_pixels": valid}

    def _maybe_log_images(self, batch: DistortedBatch, labels: torch.Tensor) -> None:
        if not self.images_due():
            return
        n = min(int(self.cfg.logging.num_images), batch.images.shape[0])
        valid = batch.labels[batch.labels != IGNORE_INDEX]
        k = int(valid.max()) + 1 if valid.numel() else 2
        panels = []
        for i in range(n):
            rgb = to_uint8_image(batch.images[i])
            panels.append(np.concatenate([rgb, to_uint8_image(batch.distorted[i]),
                                          overlay_labels(rgb, batch.labels[i].cpu().numpy(), max(k, 2))], axis=1))
        log_images(self.trainer, "contrastive/views", panels, ["image | distorted | labels"] * n)

    def export_backbone(self, out_dir: Path | str, **meta: Any) -> Path:
        """backbone.pt + backbone.json, and the decoder as decoder.pt (its rates and width recorded in
        backbone.json under "decoder")."""
        if isinstance(self.embed.decoder, torch.nn.Sequential):
            state = {k: v.detach().cpu().clone() for k, v in self.embed.decoder.state_dict().items()}
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            torch.save(state, Path(out_dir) / DECODER_FILE)
            meta["decoder"] = {"file": DECODER_FILE, "atrous_rates": [int(r) for r in self.cfg.model.atrous_rates],
                               "channels": int(self.cfg.model.decoder_channels)}
        return super().export_backbone(out_dir, **meta)
