"""FCMAE pre-training of a ConvNeXt V2 (Woo et al., CVPR 2023) as a LightningModule.

The base (`PretrainModule`) creates the timm backbone from ``cfg.model.arch`` and the optimizer (timm,
no weight decay on 1-D parameters -- biases, norms, the encoder's GRN -- and on the names from
``no_weight_decay()``: the mask token and the decoder's GRN). This module wraps the backbone in
``models.fcmae.FCMAE`` (dense-masked encoder + decoder + loss) and logs input / masked input /
reconstruction pictures every ``logging.images_every_n_steps``. The exported backbone is the timm model
itself: it loads strictly into ``timm.create_model(arch, num_classes=0)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from callbacks.image_logging import log_images
from common.errors import UserError
from common.images import denormalize
from lightning_modules.base import PretrainModule
from models.fcmae import FCMAE, upsample_mask


class FCMAEModule(PretrainModule):
    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__(cfg)
        m = self.cfg.model
        try:
            self.fcmae = FCMAE(self.backbone, mask_ratio=float(m.mask_ratio), patch_size=int(m.patch_size),
                               decoder_dim=int(m.decoder_dim), norm_pix_loss=bool(m.norm_pix_loss),
                               decoder_depth=int(m.decoder_depth), own_encoder=False)  # saved once, as backbone.*
        except ValueError as exc:
            raise UserError(f"model: {exc}") from exc
        # timm's classifier head (its final LayerNorm) is not part of the FCMAE encoder: frozen, so DDP sees no
        # unused trainable parameters; it stays in the exported state_dict (at its init) for strict loading.
        for p in self.backbone.head.parameters():
            p.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {f"fcmae.{name}" for name in self.fcmae.no_weight_decay()}

    def compile_targets(self) -> list[torch.nn.Module]:
        """``runtime.compile`` compiles the FCMAE model: it runs the backbone through its parts (stem,
        stages), so the backbone's own ``__call__`` is never used."""
        return [self.fcmae]

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        return self.fcmae(images, mask)

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        images = batch.images
        if self.cfg.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss, pred, mask = self.fcmae(images, batch.mask)
        self._maybe_log_reconstructions(images, pred, mask)
        return {"loss": loss, "loss_recon": loss.detach(), "mask_ratio": mask.detach().float().mean()}

    def _maybe_log_reconstructions(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
        if not self.images_due():
            return
        n = min(int(self.cfg.logging.num_images), images.shape[0])
        log_images(self.trainer, "fcmae/reconstruction", reconstruction_panels(self.fcmae, images[:n], pred[:n], mask[:n]),
                   ["input | masked | reconstruction"] * n)


def reconstruction_panels(model: FCMAE, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """Per image an HxW*3 uint8 picture: input, masked input (masked patches grey), reconstruction (visible
    pixels from the input, masked ones predicted and de-normalised with each patch's own mean/std)."""
    with torch.no_grad():
        rec = model.reconstruct(images, pred.detach(), mask)
        pix = upsample_mask(mask.float(), images.shape[-1] // mask.shape[-1]).unsqueeze(1).bool()
        masked = images.detach().float().masked_fill(pix, 0.0)  # 0 = the dataset mean: grey
    return [np.concatenate(row, axis=1) for row in zip(denormalize(images), denormalize(masked), denormalize(rec))]
