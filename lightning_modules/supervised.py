"""Supervised pre-training with the "Bag of Tricks" (He et al., CVPR 2019): `train.py --method supervised`.

Every trick is a config switch (configs/supervised.yaml; one YAML per ablation row in configs/tricks/):

- model: any timm model by name (``model.arch``). ResNet-B is timm's ``resnet50`` (stride on the 3x3
  conv), C adds the deep 3x3 stem (``backbone_kwargs: {stem_type: deep, stem_width: 32}`` = timm
  ``resnet50c``), D adds avg-pool downsampling shortcuts (``avg_down: true`` = ``resnet50d``); the original
  ResNet (stride on the first 1x1 conv) is ``model.stride_on_1x1: true`` (`stride_on_first_1x1`).
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
  checkpoint; ``temperature``, ``hard_weight``; `models.distillation`). The teacher sees the same
  (mixed) images and is not part of this module's state (not saved, not optimised, not averaged).

Validation logs ``val/top1`` and ``val/loss``. The exported backbone (timm key layout, no classifier)
loads into ``finetune.py --task classification --backbone RUN/backbone.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from torch import nn
from torchmetrics.aggregation import SumMetric

from common.errors import UserError
from lightning_modules.base import PretrainModule
from models.backbones import create_backbone
from models.distillation import distillation_loss
from models.export import load_weights
from models.montage_losses import soft_cross_entropy

INITS = ("xavier", "timm")


# ------------------------------------------------------------------------------------------ model tweaks / init
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


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    backbone = create_backbone(str(model_cfg.arch), **dict(model_cfg.get("backbone_kwargs", {}) or {}))
    if model_cfg.get("stride_on_1x1", False):
        stride_on_first_1x1(backbone)
    return backbone


def load_teacher(path: str | Path) -> Classifier:
    """A frozen, eval-mode classifier from a supervised run folder (its checkpoints/last.ckpt) or a
    Lightning checkpoint of `SupervisedModule` (its config is read from the checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"model.distill.teacher: checkpoint not found: {path}")
    ckpt = load_weights(path, "model.distill.teacher checkpoint")  # weights_only=True: a user's path runs no code
    try:
        cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
        state = ckpt["state_dict"]
    except (KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"model.distill.teacher: {path} is not a checkpoint of a supervised run ({exc})") from exc
    if "head.weight" not in state:
        raise UserError(f"model.distill.teacher: {path} has no classifier (head.weight); train the teacher with "
                        "--method supervised")
    teacher = Classifier(build_backbone(cfg.model), int(state["head.weight"].shape[0]))
    own = {k: v for k, v in state.items() if k.startswith(("backbone.", "head."))}
    missing, unexpected = teacher.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise UserError(f"model.distill.teacher: {path} does not match its config (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    teacher.eval().requires_grad_(False)
    return teacher


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
        self.val_hits = SumMetric()
        self.val_seen = SumMetric()
        self.val_loss_sum = SumMetric()

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
        for metric in (self.val_hits, self.val_seen, self.val_loss_sum):
            metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self(batch.images)
        n = float(batch.labels.numel())
        self.val_hits.update((logits.argmax(1) == batch.labels).float().sum())
        self.val_seen.update(torch.tensor(n, device=self.device))
        self.val_loss_sum.update(F.cross_entropy(logits.float(), batch.labels, reduction="sum"))

    def on_validation_epoch_end(self) -> None:
        seen = self.val_seen.compute().clamp(min=1)
        self.log("val/top1", self.val_hits.compute() / seen, prog_bar=True, rank_zero_only=False)
        self.log("val/loss", self.val_loss_sum.compute() / seen, rank_zero_only=False)
