"""Shared LightningModule base: owns the backbone, the optimizer (timm) and the loss bookkeeping.

A method subclasses it and implements `build_heads()` and `compute_losses(batch)`; the base logs every
loss term, stops on a non-finite loss with a clear message, and exports the backbone.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from timm.models._manipulate import group_with_matcher
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from torch import nn

from common.errors import UserError
from common.images import normalize
from models.backbones import create_backbone
from models.export import export_backbone, state_mismatch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN/inf; the runner names the newest good checkpoint in the run folder."""


def batch_size_of(batch: Any) -> int:
    """Number of images in a batch of any of this project's batch types."""
    if hasattr(batch, "images"):
        images = batch.images  # a tensor, or a list of variable-size images (detection)
        return len(images) if isinstance(images, (list, tuple)) else int(images.shape[0])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and "images" in batch:
        return int(batch["images"].shape[0])
    raise TypeError(f"cannot tell the batch size of {type(batch).__name__}")


def global_batch_size(cfg: DictConfig, world_size: int) -> int:
    """Images per optimizer step over all processes: batch x processes x accumulation."""
    return int(cfg.data.batch_size) * world_size * int(cfg.trainer.accumulate_grad_batches)


def peak_lr(cfg: DictConfig, world_size: int) -> float:
    """The configured lr, scaled linearly with the *global* batch when optim.lr_scaling=linear
    (Goyal et al. 2017: lr = base_lr * global_batch / reference_batch)."""
    lr = float(cfg.optim.lr)
    if cfg.optim.lr_scaling == "linear":
        return lr * global_batch_size(cfg, world_size) / float(cfg.optim.reference_batch_size)
    if cfg.optim.lr_scaling != "none":
        raise ValueError(f"optim.lr_scaling must be 'none' or 'linear', got '{cfg.optim.lr_scaling}'")
    return lr


def optimizer_kwargs(optim: DictConfig) -> dict[str, Any]:
    """``optim.momentum`` / ``optim.betas`` as keyword arguments for the timm optimizer ``optim.name``, each
    passed when timm's optimizer registry says that optimizer takes it (rmsprop: momentum; lion, adan:
    betas). A name timm does not know, or the wrong number of betas, is a UserError."""
    name = str(optim.name).lower()
    parts = name.split("_")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "lookahead"):
        # timm reads only the last part (and a 'lookahead_' prefix): any other prefix would be dropped unread
        raise UserError(f"optim.name={optim.name}: give a timm optimizer name, optionally as lookahead_<name>")
    try:
        info = get_optimizer_info(parts[-1])
    except ValueError:
        close = difflib.get_close_matches(parts[-1], list_optimizers(), n=5)
        raise UserError(f"optim.name={optim.name}: not a timm optimizer"
                        + (f"; similar: {', '.join(close)}" if close else "")) from None
    kwargs: dict[str, Any] = {}
    if info.has_momentum:
        kwargs["momentum"] = float(optim.momentum)
    if info.has_betas:
        betas = tuple(float(b) for b in optim.betas)
        if len(betas) != info.num_betas:
            raise UserError(f"optim.betas={list(betas)}: the {parts[-1]} optimizer takes {info.num_betas} betas")
        kwargs["betas"] = betas
    return kwargs


def resume_mismatch(own: dict[str, torch.Tensor], checkpoint: dict[str, Any], cfg: DictConfig | dict,
                    path: str | Path | None) -> str:
    """'' when the checkpoint's weights fit a model whose state_dict is `own`; else the error for resuming
    from it: the mismatched keys, the model settings changed since it was written, and the way out."""
    problems = state_mismatch(own, checkpoint.get("state_dict") or {})
    if not problems:
        return ""
    saved = ((checkpoint.get("hyper_parameters") or {}).get("config") or {}).get("model") or {}
    now = (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg).get("model") or {}
    changed = [f"model.{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    return (f"{path or 'checkpoint'}: cannot resume, the checkpoint holds another model ({problems})"
            + (f"; settings changed since it was written: {', '.join(changed[:6])}" if changed else "")
            + ". Pass --resume never to start over in this folder, or another --out")


class PretrainModule(L.LightningModule):
    """Base for pre-training methods. Subclasses set `self.backbone` (a timm model) in __init__ or call
    `super().__init__(cfg)` which creates it from `cfg.model.arch`."""

    def __init__(self, cfg: DictConfig | dict) -> None:
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.cfg = cfg
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.arch: str = cfg.model.arch
        self.backbone: nn.Module = create_backbone(self.arch, **dict(cfg.model.get("backbone_kwargs", {}) or {}))
        self._heads_built = False
        self.peak_lr: float = float(cfg.optim.lr)
        # FLOPs of one training batch, if a method knows them: ThroughputMonitor then logs FLOP/s / MFU.
        self.flops_per_batch: int | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) or float (0..1) RGB batch -> ImageNet-normalised float (``common.images.normalize``)."""
        return normalize(images, channels_last=bool(self.cfg.runtime.channels_last))

    # ---- hooks for subclasses -------------------------------------------------------------
    def build_heads(self) -> None:
        """Create layers that need the data (number of classes); called once from configure_model."""

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """Return {"loss": total, "<term>": value, ...}; every entry is logged as train/<name>."""
        raise NotImplementedError

    # ---- Lightning ----------------------------------------------------------------------
    def configure_model(self) -> None:
        if self._heads_built:
            return
        self.build_heads()
        self._heads_built = True
        if self.cfg.runtime.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.cfg.runtime.compile:
            for module in self.compile_targets():
                module.compile()  # in place: state_dict keys stay as they are

    def compile_targets(self) -> list[nn.Module]:
        """The modules that ``runtime.compile`` compiles: those whose ``__call__`` the forward goes through
        (compiling a module whose parts are called one by one would change nothing). Default: the backbone."""
        return [self.backbone]

    def no_weight_decay(self) -> set[str]:
        """Parameter names (fnmatch patterns) timm's optimizer factory keeps out of weight decay: the
        backbone's own list (a ViT's pos_embed / cls_token), under ``backbone.``. timm reads this from the
        module it is given, the LightningModule, so without it the backbone's list would be lost."""
        own = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in own()} if callable(own) else set()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: Lightning calls this after ``configure_model`` (every head built) and before it loads
        the weights, so a checkpoint of another model (the same --out re-run with another --arch, detector
        or class count) becomes a one-line UserError instead of load_state_dict's traceback."""
        message = resume_mismatch(self.state_dict(), checkpoint, self.cfg,
                                  self._trainer.ckpt_path if self._trainer is not None else None)
        if message:
            raise UserError(message)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step} ({terms}); lower optim.lr or check the data"
            )
        bs = batch_size_of(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, prog_bar=name == "loss",
                     batch_size=bs, sync_dist=False)
        return loss

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """Layer ordinals for timm's layer-wise lr decay (``optim.layer_decay``).

        timm groups a model's parameters with the model's own ``group_matcher``; a LightningModule has none,
        so timm used to put every parameter in one group and layer decay did nothing. This gives the
        backbone's parameters the ordinals timm defines for that architecture (ResNet: stem, then each
        block; ConvNeXt: stem, then each block, a stage's downsample with its first block) and everything
        outside the backbone (neck, heads, new classifiers) the top ordinal, i.e. lr scale 1."""
        if not hasattr(self.backbone, "group_matcher"):
            raise UserError(f"optim.layer_decay: the backbone {self.arch} has no timm group_matcher, so its layers "
                            "have no depth order; set optim.layer_decay=null")
        # The top-layer sentinel is matched by no regex, like timm's own unmatched parameters (a ConvNeXt's
        # head norm), so those share the top layer with the task's neck and heads.
        top = "<outside the backbone>"
        names = [n for n, _ in self.backbone.named_parameters()] + [top]
        layer_of = group_with_matcher(((n, None) for n in names), self.backbone.group_matcher(coarse=coarse),
                                      reverse=True)

        def ordinal(name: str) -> tuple[float, ...]:
            inner = name.removeprefix("backbone.")
            return (float(layer_of[inner if inner != name and inner in layer_of else top]),)

        return ordinal

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        world = self.trainer.world_size if self._trainer is not None else 1
        self.peak_lr = peak_lr(self.cfg, world)
        return create_optimizer_v2(
            self, opt=str(o.name).lower(), lr=self.peak_lr, weight_decay=float(o.weight_decay),
            filter_bias_and_bn=bool(o.no_decay_bias_norm),
            layer_decay=None if o.get("layer_decay") is None else float(o.layer_decay),  # range: cheaplunch.checks
            **optimizer_kwargs(o),
        )

    def images_due(self) -> bool:
        """True once per `logging.images_every_n_steps` optimizer steps, on global rank 0 only (the step is
        remembered, so gradient accumulation's micro-batches do not log it again)."""
        every = int(self.cfg.logging.images_every_n_steps)
        if self._trainer is None or every <= 0 or self.global_step % every or not self.trainer.is_global_zero:
            return False
        if getattr(self, "_last_image_step", None) == self.global_step:
            return False
        self._last_image_step = self.global_step
        return True

    # ---- export -------------------------------------------------------------------------
    def export_backbone(self, out_dir: Path | str, **meta: Any) -> Path:
        meta.setdefault("global_step", int(self.global_step))
        return export_backbone(self.backbone, self.arch, out_dir, method=type(self).__name__, **meta)
