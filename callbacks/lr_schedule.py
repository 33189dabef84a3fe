"""Per-step learning-rate schedule: linear warm-up, then cosine (or step) decay.

The lr of every optimizer param group is set before each optimizer step from `trainer.global_step`
(the number of optimizer steps taken so far), so the schedule is right under gradient accumulation
(the lr is constant across the micro-batches of one step) and after a resume (global_step is
restored from the checkpoint). A param group may carry an `lr_scale` (layer-wise lr decay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from common.errors import UserError


def scheduled_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    min_lr_factor: float = 0.0,
    name: str = "cosine",
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Learning rate to use for optimizer step `step` (0-based).

    Warm-up: lr rises linearly from base_lr * warmup_start_factor at step 0 to base_lr at step
    `warmup_steps`. After it, `cosine` decays from base_lr to base_lr * min_lr_factor at `total_steps`;
    `step` multiplies by `gamma` at each milestone (fractions of total_steps); `constant` stays.
    """
    if step < warmup_steps:
        frac = step / warmup_steps
        return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * frac)
    min_lr = base_lr * min_lr_factor
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        passed = sum(step >= round(m * total_steps) for m in milestones)
        return base_lr * gamma**passed
    if name == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule '{name}' (choices: cosine, step, constant)")


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
        scheduled_lr(0, base_lr=1.0, total_steps=1, name=name)  # fail early on a bad name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = int(trainer.estimated_stepping_batches)
        if self.base_lr is None:
            self.base_lr = float(pl_module.peak_lr)
        if self.warmup_epochs is not None:
            self.warmup_steps = round(self.warmup_epochs * steps_per_epoch(trainer))

    def lr_at(self, step: int) -> float:
        if self.base_lr is None:
            raise RuntimeError("WarmupCosineLR: base lr unknown before training starts")
        return scheduled_lr(
            step,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start_factor=self.warmup_start_factor,
            min_lr_factor=self.min_lr_factor,
            name=self.name,
            milestones=self.milestones,
            gamma=self.gamma,
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        lr = self.lr_at(trainer.global_step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        pl_module.log("lr", lr, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)
