"""Montage pre-training (Zhou et al., "Cheaper Pre-training Lunch", ECCV 2020) as a LightningModule.

Backbone -> 1x1-conv dense classifier -> one of three objectives (cfg.model.objective):
`global` (area-weighted mixed label), `blockwise` (per-region pooling) or `erf_dense` (soft labels from
the effective receptive fields, refreshed by callbacks.erf_refresh.ERFRefresh).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from callbacks.erf_refresh import ERFRefresh
from callbacks.image_logging import log_images
from lightning_modules.base import PretrainModule
from models.heads import DenseClassifier
from models.layout import MontageLayout
from models.montage_losses import blockwise_loss, erf_dense_loss, global_loss

OBJECTIVES = ("global", "blockwise", "erf_dense")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MontageModule(PretrainModule):
    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__(cfg)
        if self.cfg.model.objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {OBJECTIVES}, got '{self.cfg.model.objective}'")
        self.objective: str = self.cfg.model.objective
        self.layout = MontageLayout(canvas=(int(self.cfg.data.canvas),) * 2, split=tuple(self.cfg.data.split))

    # ---- layers and buffers that depend on the data ---------------------------------------------
    def build_heads(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        num_classes = int(datamodule.num_classes) if datamodule is not None else int(self.cfg.model.num_classes)
        self.num_classes = num_classes
        self.classifier = DenseClassifier(self.backbone.num_features, num_classes)
        fh, fw = self.feature_size()
        self.register_buffer("position_regions", self.layout.position_regions((fh, fw)), persistent=False)
        self.register_buffer("region_areas", self.layout.region_areas(), persistent=False)
        # ERF soft-label weights (h, w, 4); start as one-hot on the own region (= block-wise) until the
        # first refresh. Persistent: a resumed run continues with the same weights.
        one_hot = torch.nn.functional.one_hot(self.position_regions, 4).float()
        self.register_buffer("erf_weights", one_hot)
        self.register_buffer("erf_step", torch.tensor(-1, dtype=torch.long))

    def feature_size(self) -> tuple[int, int]:
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            out = self.backbone(torch.zeros(1, 3, *self.layout.canvas))
            self.backbone.train(was_training)
        return int(out.shape[-2]), int(out.shape[-1])

    def configure_callbacks(self) -> list[Callback]:
        erf = self.cfg.model.erf
        if self.objective != "erf_dense":
            return []
        return [ERFRefresh(every_n_steps=int(erf.refresh_every), num_montages=int(erf.num_montages),
                           tau=float(self.cfg.model.tau), chunk_size=erf.chunk_size)]

    # ---- training -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense class logits (B, K, h, w)."""
        return self.classifier(self.backbone(images))

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        images = batch.images
        if self.cfg.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self(images)
        labels = batch.labels
        extra: dict[str, torch.Tensor] = {}
        if self.objective == "global":
            loss = global_loss(logits, labels, self.region_areas)
        elif self.objective == "blockwise":
            loss = blockwise_loss(logits, labels, self.position_regions)
        else:
            loss, extra = erf_dense_loss(logits, labels, self.erf_weights, self.position_regions)
        with torch.no_grad():
            region_acc = self.region_accuracy(logits, labels)
        self._maybe_log_montages(batch)
        terms = {f"loss_{self.objective}/{name}": value for name, value in extra.items()}
        return {"loss": loss, f"loss_{self.objective}": loss.detach(), **terms, "region_acc": region_acc}

    def region_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fraction of cells whose region-pooled prediction equals the cell's label (monitoring only)."""
        hits, count = logits.new_zeros(()), 0
        for r in range(4):
            sel = self.position_regions == r
            if sel.any():
                pred = logits[:, :, sel].mean(dim=2).argmax(dim=1)
                hits = hits + (pred == labels[:, r]).float().sum()
                count += labels.shape[0]
        return hits / max(count, 1)

    def _maybe_log_montages(self, batch: Any) -> None:
        every = int(self.cfg.logging.images_every_n_steps)
        if self._trainer is None or every <= 0 or self.global_step % every or not self.trainer.is_global_zero:
            return
        if getattr(self, "_last_image_step", None) == self.global_step:
            return
        self._last_image_step = self.global_step
        n = min(int(self.cfg.logging.num_images), batch.images.shape[0])
        images = denormalize(batch.images[:n])
        names = getattr(self.trainer.datamodule, "class_names", None)
        captions = [", ".join(_label_name(int(v), names) for v in row) for row in batch.labels[:n]]
        log_images(self.trainer, "montages", [draw_cell_borders(im, self.layout) for im in images], captions)


def _label_name(label: int, names: list[str] | None) -> str:
    if names is not None and label < len(names):
        return names[label]
    return str(label)


def denormalize(images: torch.Tensor) -> list:
    """(B, 3, H, W) ImageNet-normalised -> list of HxWx3 uint8 arrays."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.detach().float() * std + mean).clamp(0, 1) * 255).round().byte()
    return [im.permute(1, 2, 0).cpu().numpy() for im in pixels]


def draw_cell_borders(image, layout: MontageLayout, colour: tuple[int, int, int] = (255, 255, 0)):
    """A copy of the montage with the preset cell borders drawn (1 px)."""
    out = image.copy()
    for x, y, w, h in layout.cell_boxes().values():
        out[y, x : x + w] = colour
        out[y + h - 1, x : x + w] = colour
        out[y : y + h, x] = colour
        out[y : y + h, x + w - 1] = colour
    return out
