"""The measured compute of a run, written to ``compute.json`` in the run folder.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` around the forward and backward of
real training steps of the run itself (from the LightningModule's ``training_step`` to the end of its
backward; other callbacks' work, e.g. a montage ERF refresh, stays outside): steps ``skip`` ..
``skip + count - 1`` (the first step is skipped: lazy initialisation is not a typical step). Total FLOPs =
mean FLOPs of the counted steps x optimizer steps run, per process, x the number of processes. Beside
it: wall seconds of training, images seen and the device, so that a budget in FLOPs can be compared across
machines and a budget in time on one machine.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.base import batch_size_of


class ComputeMeter(Callback):
    """Counts the FLOPs of `count` training steps and writes the run's compute to `path` (rank 0)."""

    def __init__(self, path: Path | str, count: int = 3, skip: int = 1) -> None:
        self.path = Path(path)
        self.count, self.skip = int(count), int(skip)
        self.step_flops: list[int] = []
        self._counter: FlopCounterMode | None = None
        self._wanted = False  # the current micro-batch is counted
        self._micro_flops = 0
        self._started: float | None = None
        self._wall_before = 0.0  # training seconds of earlier (resumed) sessions
        self._images = 0
        self._images_before = 0
        self._batch_started: float | None = None
        self.step_seconds: list[float] = []  # optimizer steps neither counted nor the first (their speed, uninstrumented)
        self.data_seconds: list[float] = []  # waits for the next batch between two steps (no validation between)
        self._step_ended: float | None = None
        self.validations: list[tuple[float, int]] = []  # (seconds, batches) of each validation, sanity check excluded
        self._validation_started: float | None = None

    # ---- counting ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        training_step = pl_module.training_step

        def counted_training_step(*args: Any, **kwargs: Any) -> Any:
            """The module's training_step, inside the counter on a counted step (closed after backward)."""
            if self._wanted and self._counter is None:
                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()
            return training_step(*args, **kwargs)

        pl_module.training_step = counted_training_step  # instance attribute: the class stays untouched

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._images += batch_size_of(batch)
        self._wanted = len(self.step_flops) < self.count and trainer.global_step >= self.skip
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._batch_started = time.perf_counter()
            if self._step_ended is not None and trainer.global_step > self.skip:
                self.data_seconds.append(self._batch_started - self._step_ended)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._micro_flops += int(self._counter.get_total_flops())
            self._counter = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and not self._wanted and trainer.global_step > self.skip and self._batch_started is not None:
            self.step_seconds.append(time.perf_counter() - self._batch_started)
        self._step_ended = time.perf_counter() if stepped else None
        if not self._wanted:
            return
        self._wanted = False
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # an optimizer step: its micro-batches
            self.step_flops.append(self._micro_flops)
            self._micro_flops = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_ended = None  # the next wait for data is not a typical one
        self._validation_started = None if trainer.sanity_checking else time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_started is not None:
            batches = int(sum(trainer.num_val_batches))
            self.validations.append((time.perf_counter() - self._validation_started, batches))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.__dict__.pop("training_step", None)  # back to the class's method

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Written at the end of fit, not of the training loop: a run resumed from a checkpoint at its last step
        (killed during its final validation) skips the loop, and its compute comes from the checkpoint."""
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary(trainer), indent=2) + "\n")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        pl_module.__dict__.pop("training_step", None)

    # ---- result -----------------------------------------------------------------------------------
    def _wall_seconds(self) -> float:
        """Training seconds so far, over every (resumed) session."""
        return self._wall_before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        steps = int(trainer.global_step)
        world = int(trainer.world_size)
        per_step = statistics.fmean(self.step_flops) if self.step_flops else None
        device = str(trainer.strategy.root_device)
        if trainer.strategy.root_device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(trainer.strategy.root_device)})"
        return {
            "optimizer_steps": steps,
            "flops_per_step": per_step,            # one process
            "flops_per_step_min": min(self.step_flops) if self.step_flops else None,
            "flops_per_step_max": max(self.step_flops) if self.step_flops else None,
            "counted_steps": len(self.step_flops),
            "processes": world,
            "total_flops": per_step * steps * world if per_step is not None else None,
            "wall_seconds": round(self._wall_seconds(), 2),
            # median seconds of an uninstrumented optimizer step (data loading and validation excluded): what a
            # short probe says a long run's step costs, unlike its wall seconds (counted steps run slower)
            "step_seconds": round(statistics.median(self.step_seconds), 4) if self.step_seconds else None,
            # median wait for the next batch between steps (data loading the step did not hide)
            "data_seconds": round(statistics.median(self.data_seconds), 4) if self.data_seconds else None,
            # one validation: median seconds, the batches it ran, and the batches of the whole val loader (a probe
            # runs a few: the whole is extrapolated from them)
            "validation_seconds": round(statistics.median(v for v, _ in self.validations), 3) if self.validations
            else None,
            "validation_batches": self.validations[-1][1] if self.validations else None,
            "val_loader_batches": _loader_batches(trainer),
            "images_seen": (self._images_before + self._images) * world,
            "device": device,
            "method": "FlopCounterMode on counted real steps; total = mean per step x steps x processes",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step_flops": list(self.step_flops), "wall_seconds": self._wall_seconds(),
                "images": self._images_before + self._images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming: the counts and the time of the interrupted session carry over."""
        self.step_flops = list(state_dict.get("step_flops", []))
        self._wall_before = float(state_dict.get("wall_seconds", 0.0))
        self._images_before = int(state_dict.get("images", 0))


def _loader_batches(trainer: L.Trainer) -> int | None:
    """Batches of the whole val loader (whatever limit_val_batches ran), None without one."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        return None
    try:
        return sum(len(d) for d in (loaders if isinstance(loaders, (list, tuple)) else [loaders]))
    except TypeError:  # an iterable loader without a length
        return None
