"""Per-step learning-rate schedule: linear warm-up, then cosine (or step) decay, computed by timm's
schedulers (``CosineLRScheduler`` / ``MultiStepLRScheduler``, per update: ``t_in_epochs=False``).

The lr of every optimizer param group is set before each optimizer step from `trainer.global_step`
(the number of optimizer steps taken so far), so the schedule is right under gradient accumulation
(the lr is constant across the micro-batches of one step) and after a resume (global_step is
restored from the checkpoint). A param group may carry an `lr_scale` (layer-wise lr decay; timm applies it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from common.errors import UserError

SCHEDULES = ("cosine", "step", "constant")


def check_schedule_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule '{name}' (choices: {', '.join(SCHEDULES)})")


def timm_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    min_lr_factor: float = 0.0,
    name: str = "cosine",
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> Scheduler:
    """The timm scheduler of this schedule over `optimizer`, every param group starting from `base_lr`.

    Warm-up: lr rises linearly from base_lr * warmup_start_factor at step 0 to base_lr at step
    `warmup_steps`. After it, `cosine` decays from base_lr to base_lr * min_lr_factor at `total_steps`
    (the cosine spans the steps after the warm-up); `step` multiplies by `gamma` at each milestone (fractions
    of total_steps, counted from step 0); `constant` stays."""
    check_schedule_name(name)
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr  # timm's base value of every group (its lr_scale is applied on top)
    warmup = dict(warmup_t=warmup_steps, warmup_lr_init=base_lr * warmup_start_factor, t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=base_lr * min_lr_factor,
                                 warmup_prefix=True, **warmup)
    # timm applies a milestone m at step m - 1 (its historical convention), so each is given one step later
    decay_t = [round(m * total_steps) + 1 for m in milestones] if name == "step" else []
    return MultiStepLRScheduler(optimizer, decay_t=decay_t, decay_rate=gamma, warmup_prefix=False, **warmup)


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps in one epoch: the training batches per epoch over the accumulation, rounded up as
    Lightning steps on an epoch's last, partial accumulation. Not the total steps over the epochs: that
    total is capped at ``trainer.max_steps``."""
    batches = trainer.num_training_batches
    if math.isinf(batches):
        raise UserError("schedule.warmup_epochs needs a training set of known length (steps per epoch); "
                        "use schedule.warmup_steps")
    return math.ceil(int(batches) / trainer.accumulate_grad_batches)


class WarmupCosineLR(Callback):
    """Sets the lr of every param group before each training batch (see module docstring).

    `base_lr=None` takes the module's `peak_lr` (set in configure_optimizers, after linear scaling).
    `warmup_epochs` (if given) is converted to steps with the trainer's steps per epoch (`steps_per_epoch`).
    The scheduled value is logged as `lr`.
    """

    def __init__(
        self,
        base_lr: float | None = None,
        *,
        name: str = "cosine",
        warmup_steps: int = 0,
        warmup_epochs: float | None = None,
        warmup_start_factor: float = 0.0,
        min_lr_factor: float = 0.0,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
    ) -> None:
        self.base_lr = base_lr
        self.name = name
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.warmup_start_factor = warmup_start_factor
        self.min_lr_factor = min_lr_factor
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.total_steps = 0
        self.schedulers: list[Scheduler] = []
        check_schedule_name(name)  # fail early, before training starts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = int(trainer.estimated_stepping_batches)
        if self.base_lr is None:
            self.base_lr = float(pl_module.peak_lr)
        if self.warmup_epochs is not None:
            self.warmup_steps = round(self.warmup_epochs * steps_per_epoch(trainer))
        self.schedulers = [timm_scheduler(optimizer, **self.schedule()) for optimizer in trainer.optimizers]

    def schedule(self) -> dict[str, Any]:
        if self.base_lr is None:
            raise RuntimeError("WarmupCosineLR: base lr unknown before training starts")
        return dict(base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    warmup_start_factor=self.warmup_start_factor, min_lr_factor=self.min_lr_factor, name=self.name,
                    milestones=self.milestones, gamma=self.gamma)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        for scheduler in self.schedulers:
            scheduler.step_update(trainer.global_step)
        group = trainer.optimizers[0].param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)
        pl_module.log("lr", lr, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)
