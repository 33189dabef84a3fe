"""Start-up checks of the resolved config (issue #11): an option that the chosen method / task cannot honour
is a UserError before any data is read, never a warning and a silent no-op.

Checks that need the model or the data stay where those are built (e.g. ``model.gn_groups`` against the
channel counts in ``models.detectors.convert_norm``, ``data.class_names`` against the data in
``cheaplunch.finetune``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import UserError
from datamodules.image_check import check_policy as check_bad_images_policy
from lightning_modules.base import optimizer_kwargs

MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's (it only warns otherwise)

# The typed part of the config schema: key -> (type, test of the value, what is allowed). Keys a method or
# task does not have are skipped.
SCHEMA: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
    "trainer.max_steps": (int, lambda v: v >= 1, "an integer >= 1 (the lr schedule needs a finite length)"),
    "trainer.accumulate_grad_batches": (int, lambda v: v >= 1, "an integer >= 1"),
    "data.batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "data.val_batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": (int, lambda v: v >= 0, "an integer >= 0"),
    "optim.lr": (float, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "optim.weight_decay": (float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "optim.momentum": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.reference_batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "schedule.warmup_steps": (int, lambda v: v >= 0, "an integer >= 0"),
    "schedule.warmup_start_factor": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "schedule.min_lr_factor": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "optim.layer_decay": (float, lambda v: 0 < v <= 1, "a number in (0, 1], or null for no layer-wise lr decay"),
    "ema.decay": (float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "checkpoint.every_n_steps": (int, lambda v: v >= 1, "an integer >= 1"),
    "logging.num_images": (int, lambda v: v >= 0, "an integer >= 0"),
}


def check_schema(cfg: DictConfig) -> None:
    """Types and ranges of the SCHEMA keys: one UserError with the key, the value and what is allowed."""
    for key, (kind, ok, allowed) in SCHEMA.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        try:
            if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
                raise ValueError
            number = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{key}={value!r}: must be {allowed}") from None
        if not ok(number):
            raise UserError(f"{key}={value!r}: must be {allowed}")


def check_config(cfg: DictConfig, *, task: str | None = None, training: bool = True) -> None:
    """Every start-up check: `task` is the fine-tuning task (None for pre-training); `training=False` (an
    evaluation) skips the checks of options that only training reads."""
    check_schema(cfg)
    policy = OmegaConf.select(cfg, "data.bad_images", default=None)
    if policy is not None:
        check_bad_images_policy(policy)
    precision = str(cfg.runtime.matmul_precision)
    if precision not in MATMUL_PRECISIONS:
        raise UserError(f"runtime.matmul_precision={precision}: must be one of {', '.join(MATMUL_PRECISIONS)}")
    if task is not None and cfg.get("task") != task:
        raise UserError(f"task={cfg.get('task')} in the config, but this is a '{task}' run: the task is chosen "
                        "by --task (or the checkpoint) alone; drop the task key")
    if not training:
        return
    optimizer_kwargs(cfg.optim)  # an unknown optimizer name, or the wrong number of betas
    if task is not None:
        check_frozen_backbone(cfg)


def check_frozen_backbone(cfg: DictConfig) -> None:
    """``model.freeze_backbone=true`` leaves nothing for options that act on a training backbone."""
    model = cfg.model
    if not model.get("freeze_backbone", False):
        return
    if cfg.optim.get("layer_decay") is not None:
        raise UserError("optim.layer_decay has no effect when the backbone is frozen (model.freeze_backbone=true): "
                        "only the head trains, at one lr; set optim.layer_decay=null")
    stages = int(model.get("frozen_stages") or 0)
    if stages > 0:
        raise UserError(f"model.frozen_stages={stages} has no effect with model.freeze_backbone=true (the whole "
                        "backbone is frozen already); set model.frozen_stages=0")
    drop = float((model.get("backbone_kwargs") or {}).get("drop_path_rate") or 0.0)
    if drop > 0:
        raise UserError(f"model.backbone_kwargs.drop_path_rate={drop} has no effect with model.freeze_backbone=true "
                        "(a frozen backbone runs in eval mode, where drop path is off); set it to 0")
