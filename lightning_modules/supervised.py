"""Supervised pre-training with the "Bag of Tricks" (He et al., CVPR 2019): `train.py --method supervised`.

Every trick is a config switch (configs/supervised.yaml; one YAML per ablation row in configs/tricks/):

- model: any timm model by name (``model.arch``). ResNet-B is timm's ``resnet50`` (stride on the 3x3
  conv), C adds the deep 3x3 stem (``backbone_kwargs: {stem_type: deep, stem_width: 32}`` = timm
  ``resnet50c``), D adds avg-pool downsampling shortcuts (``avg_down: true`` = ``resnet50d``); the original
  ResNet (stride on the first 1x1 conv) is ``model.stride_on_1x1: true``. The model surgery lives in
  `models.tricks` (`stride_on_first_1x1`, `xavier_init`, `set_zero_gamma`); this module only applies it.
- init: ``model.init: xavier`` (paper: Xavier-uniform conv/FC weights, zero biases, BN gamma 1 beta 0)
  or ``timm`` (the model's own); ``model.zero_gamma`` sets the last BN gamma of every residual block
  to 0 (or, when off, to 1 -- timm zero-inits them by default).
- optimizer / schedule / precision / EMA: the shared keys of configs/base.yaml, handled by the base
  class and the runner: Nesterov SGD is timm's ``sgd``; ``optim.lr_scaling: linear`` scales by the
  *global* batch; ``optim.no_decay_bias_norm`` puts biases and BN parameters in a no-decay group;
  ``schedule.warmup_epochs`` + ``schedule.name: cosine|step``; ``trainer.precision``; ``ema.enabled``.
- loss: cross-entropy with ``model.label_smoothing``; mixup (``model.mixup_alpha`` > 0, timm's
  ``Mixup`` with the smoothing folded into its soft targets, soft-target CE); knowledge distillation
  from a teacher checkpoint (``model.distill.teacher``: a supervised run folder or its Lightning
  checkpoint; ``temperature``, ``hard_weight``; `models.distillation`, also `load_teacher`). The teacher sees the same
  (mixed) images and is not part of this module's state (not saved, not optimised, not averaged).

Validation logs ``val/top1`` and ``val/loss``. The exported backbone (timm key layout, no classifier)
loads into ``finetune.py --task classification --backbone RUN/backbone.pt``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from torch import nn
from torchmetrics.aggregation import MeanMetric

from common.errors import UserError
from lightning_modules.base import PretrainModule
from models.classifier import Classifier
from models.distillation import distillation_loss, load_teacher
from models.evaluation import topk_accuracy
from models.montage_losses import soft_cross_entropy
from models.tricks import last_block_norms, set_zero_gamma, stride_on_first_1x1, xavier_init

INITS = ("xavier", "timm")


# ------------------------------------------------------------------------------------------ LightningModule
class SupervisedModule(PretrainModule):
    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__(cfg)
        m = self.cfg.model
        if str(m.init) not in INITS:
            raise UserError(f"model.init must be one of {', '.join(INITS)}, got '{m.init}'")
        if m.get("stride_on_1x1", False):
            stride_on_first_1x1(self.backbone)
        if str(m.init) == "xavier":
            xavier_init(self.backbone)
        if last_block_norms(self.backbone) or m.zero_gamma:
            set_zero_gamma(self.backbone, bool(m.zero_gamma))
        self.label_smoothing = float(m.label_smoothing)
        self.mixup_alpha = float(m.mixup_alpha)
        if self.mixup_alpha > 0 and int(self.cfg.data.batch_size) % 2:
            raise UserError("mixup (model.mixup_alpha > 0) mixes pairs: data.batch_size must be even")
        d = m.distill
        if OmegaConf.is_missing(d, "teacher"):
            raise UserError("this config distils from a teacher: set model.distill.teacher=RUN_FOLDER (a supervised run)")
        self.temperature, self.hard_weight = float(d.temperature), float(d.hard_weight)
        # Kept out of the module's children: not saved, not optimised, not EMA-averaged, not wrapped by DDP.
        self._teacher: list[Classifier] = [load_teacher(d.teacher)] if d.teacher else []
        self.num_classes: int | None = int(m.num_classes) if m.num_classes is not None else None
        self.mixup: Mixup | None = None

    # ---- heads ------------------------------------------------------------------------------
    def build_heads(self) -> None:
        if self.num_classes is None:
            dm = self._trainer.datamodule if self._trainer is not None else None
            if dm is None or not hasattr(dm, "num_classes"):
                raise UserError("model.num_classes is not set and no datamodule tells the number of classes")
            self.num_classes = int(dm.num_classes)
        self.dropout = nn.Dropout(float(self.cfg.model.dropout))
        self.head = nn.Linear(int(self.backbone.num_features), self.num_classes)
        if str(self.cfg.model.init) == "xavier":
            xavier_init(self.head)
        if self.mixup_alpha > 0:
            self.mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=0.0, prob=1.0, mode="batch",
                               label_smoothing=self.label_smoothing, num_classes=self.num_classes)
        if self._teacher:
            t_classes = self._teacher[0].head.out_features
            if t_classes != self.num_classes:
                raise UserError(f"model.distill.teacher predicts {t_classes} classes, the data has {self.num_classes}")
        self.val_top1 = topk_accuracy(self.num_classes, 1)
        self.val_loss = MeanMetric()

    @property
    def teacher(self) -> Classifier | None:
        return self._teacher[0] if self._teacher else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone(images)
        f = f.mean(dim=(2, 3)) if f.ndim == 4 else f
        return self.head(self.dropout(f))

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ---- losses -----------------------------------------------------------------------------
    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, target): with mixup, mixed images and soft targets (label smoothing included);
        else the images and the class indices."""
        if self.mixup is not None:
            return self.mixup(images.clone(), labels)  # timm mixes in place: keep the batch intact
        return images, labels

    def classification_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return soft_cross_entropy(logits, target)

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        images = batch.images
        if self.cfg.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images, target = self.targets(images, batch.labels)
        logits = self(images)
        out: dict[str, torch.Tensor] = {}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            if target.ndim == 1 and self.label_smoothing > 0:  # smoothing applies to the hard term
                target = F.one_hot(target, logits.shape[-1]).float() * (1 - self.label_smoothing) \
                    + self.label_smoothing / logits.shape[-1]
            loss, hard, soft = distillation_loss(logits, teacher_logits, target, self.temperature, self.hard_weight)
            out.update(ce=hard.detach(), kd=soft.detach())
        else:
            loss = self.classification_loss(logits, target)
            out["ce"] = loss.detach()
        if self.mixup is None:
            out["acc"] = (logits.detach().argmax(1) == batch.labels).float().mean()
        return {"loss": loss, **out}

    # ---- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_top1, self.val_loss):
            metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self(batch.images)
        self.val_top1.update(logits, batch.labels)
        self.val_loss.update(F.cross_entropy(logits.float(), batch.labels, reduction="none"))  # mean over samples

    def on_validation_epoch_end(self) -> None:
        self.log("val/top1", self.val_top1.compute(), prog_bar=True, rank_zero_only=False)
        self.log("val/loss", self.val_loss.compute(), rank_zero_only=False)
