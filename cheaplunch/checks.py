"""Start-up checks of the resolved config (issue #11): an option that the chosen method / task cannot honour
is a UserError before any data is read, never a warning and a silent no-op.

Checks that need the model or the data stay where those are built (e.g. ``model.gn_groups`` against the
channel counts in ``models.detectors.convert_norm``, ``data.class_names`` against the data in
``cheaplunch.finetune``)."""

from __future__ import annotations

from omegaconf import DictConfig

from cheaplunch.errors import UserError
from lightning_modules.base import optimizer_kwargs

MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's (it only warns otherwise)


def check_config(cfg: DictConfig, *, task: str | None = None, training: bool = True) -> None:
    """Every start-up check: `task` is the fine-tuning task (None for pre-training); `training=False` (an
    evaluation) skips the checks of options that only training reads."""
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
        check_frozen_backbone(cfg.model)


def check_frozen_backbone(model: DictConfig) -> None:
    """``model.freeze_backbone=true`` leaves nothing for options that act on a training backbone."""
    if not model.get("freeze_backbone", False):
        return
    stages = int(model.get("frozen_stages") or 0)
    if stages > 0:
        raise UserError(f"model.frozen_stages={stages} has no effect with model.freeze_backbone=true (the whole "
                        "backbone is frozen already); set model.frozen_stages=0")
    drop = float((model.get("backbone_kwargs") or {}).get("drop_path_rate") or 0.0)
    if drop > 0:
        raise UserError(f"model.backbone_kwargs.drop_path_rate={drop} has no effect with model.freeze_backbone=true "
                        "(a frozen backbone runs in eval mode, where drop path is off); set it to 0")
