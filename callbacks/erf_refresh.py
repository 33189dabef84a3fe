"""ERF refresh: recompute the ERF-adaptive soft-label weights every N optimizer steps.

The weights depend only on the network and the preset regions (Zhou et al., ECCV 2020, Sec. 3.3), so
they are recomputed periodically (paper: every 5,000 iterations) rather than every step. Rank 0
computes them on a fixed set of montages and broadcasts; they live in the module's `erf_weights`
buffer (with `erf_step`, the step of the model they were computed from), so they are saved in the
checkpoint and a resumed run continues with the same weights. `bn_mode` picks the BatchNorm statistics
of the ERF (models/erf.py: "eval" = running statistics, "train" = those of the ERF montages).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.image_logging import log_images
from common.errors import UserError
from common.images import erf_heatmap_grid
from models.erf import BN_MODES, BatchNormMode, compute_erf, soft_label_weights


class ERFRefresh(Callback):
    def __init__(self, every_n_steps: int = 5000, num_montages: int = 4, tau: float = 0.7,
                 chunk_size: int | None = None, bn_mode: BatchNormMode = "eval") -> None:
        if every_n_steps <= 0:
            raise ValueError("model.erf.refresh_every must be a positive number of steps")
        if bn_mode not in BN_MODES:
            raise UserError(f"model.erf.bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        self.every_n_steps = every_n_steps
        self.num_montages = num_montages
        self.tau = tau
        self.chunk_size = chunk_size
        self.bn_mode = bn_mode

    def due(self, step: int, last_refresh_step: int) -> bool:
        """A refresh is due at the start (never computed) and at every multiple of every_n_steps."""
        if last_refresh_step < 0:
            return True
        return step % self.every_n_steps == 0 and step > last_refresh_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self.due(step, int(pl_module.erf_step)):
            self.refresh(trainer, pl_module, step)

    @torch.no_grad()
    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        weights = erf = None
        if trainer.is_global_zero:
            start = time.perf_counter()
            images = trainer.datamodule.erf_images(self.num_montages).to(pl_module.device)
            with torch.enable_grad():
                erf = compute_erf(pl_module.backbone, images, chunk_size=self.chunk_size, bn_mode=self.bn_mode)
            masks = pl_module.layout.region_masks().to(erf)
            weights = soft_label_weights(erf, masks, tau=self.tau).float().cpu()
            rank_zero_info(f"ERF refresh at step {step} (BatchNorm {self.bn_mode}): "
                           f"{time.perf_counter() - start:.2f}s, "
                           f"mean own-region weight {self._own_weight(weights, pl_module):.3f}")
        weights = trainer.strategy.broadcast(weights, src=0)
        pl_module.erf_weights.copy_(weights.to(pl_module.erf_weights))
        pl_module.erf_step.fill_(step)
        if trainer.is_global_zero:
            pl_module.log("erf/own_region_weight", self._own_weight(weights, pl_module), rank_zero_only=True)
            log_images(trainer, "erf", [erf_heatmap_grid(erf.cpu())], [f"ERF at step {step}"])

    @staticmethod
    def _own_weight(weights: torch.Tensor, pl_module: L.LightningModule) -> float:
        regions = pl_module.position_regions.cpu()
        return float(weights.gather(-1, regions.unsqueeze(-1)).mean())
