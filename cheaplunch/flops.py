"""Training compute, measured: FLOPs of real training steps counted with PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward; convolutions and matrix products,
2 FLOPs per multiply-add, the convention of the papers that report training FLOPs).

Counting every step of a run would slow it down, so a run's cost is measured on a few real steps of
its own data and model (``measure_step_flops``) and extrapolated: total = mean FLOPs per measured step
x optimizer steps. Steps differ only where the work does (multi-scale detection sizes, proposal counts),
so the mean over several real batches is the estimate; the spread is recorded beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of everything `step()` runs (call forward and backward inside it)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def training_step_flops(loss_fn: Callable[[], torch.Tensor], parameters: Iterable[torch.nn.Parameter]) -> int:
    """FLOPs of one training step's forward and backward (`loss_fn()` returns the loss); the gradients it
    leaves are cleared, so the model is as it was."""
    params = [p for p in parameters if p.requires_grad]

    def step() -> None:
        loss_fn().backward()

    flops = count_flops(step)
    for p in params:
        p.grad = None
    return flops


@dataclass
class StepFlops:
    """FLOPs per optimizer step measured on `measured_steps` real batches."""

    per_step: float
    min_per_step: int
    max_per_step: int
    measured_steps: int

    def total(self, steps: int) -> float:
        """Extrapolated FLOPs of `steps` optimizer steps."""
        return self.per_step * steps

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_step_flops(module: torch.nn.Module, batches: Iterable[Any], accumulate: int = 1) -> StepFlops:
    """Mean FLOPs per optimizer step of a LightningModule with ``compute_losses(batch) -> {"loss": ...}``,
    over the given real batches (each one micro-batch; an optimizer step is `accumulate` of them)."""
    was_training = module.training
    module.train()
    counts = [training_step_flops(lambda b=batch: module.compute_losses(b)["loss"], module.parameters())
              for batch in batches]
    module.train(was_training)
    if not counts:
        raise ValueError("measure_step_flops needs at least one batch")
    return StepFlops(statistics.fmean(counts) * accumulate, min(counts) * accumulate, max(counts) * accumulate,
                     len(counts))
