"""Shared base of the fine-tuning LightningModules (detection, segmentation, classification).

It is a `PretrainModule` (same backbone construction from ``model.arch``, timm optimizer with no
weight decay on biases / norms, linear lr scaling, per-step warm-up + cosine/step schedule, non-finite
loss check, per-term loss logging), plus:

- the initial backbone weights (``backbone_state``, from ``models.backbone_loading``) loaded strictly
  into ``self.backbone`` before any task layer wraps it; the task model holds the same backbone
  module, so a fine-tuned checkpoint still has the backbone under ``backbone.*`` (and can itself be
  passed to ``--backbone``);
- ``model.freeze_backbone`` (linear probe): no gradients to the backbone, and its norm layers kept in
  eval mode;
- the evaluation record: every validation stores its metrics (``self.results``) and appends them to
  ``self.history`` with the training step, which the runner writes to ``results.json`` /
  ``history.json``; metrics are also logged as ``val/<name>``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lightning_modules.base import PretrainModule
from models.backbone_loading import load_backbone_weights


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"bbox": {"AP": .3}} -> {"bbox/AP": .3}; None (undefined) values are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        elif value is not None:
            flat[name] = float(value)
    return flat


class FinetuneModule(PretrainModule):
    """Base for the fine-tuning tasks; subclasses build their task model around `self.backbone`."""

    task: str = ""

    def __init__(self, cfg: DictConfig | dict, backbone_state: dict[str, torch.Tensor] | None = None,
                 backbone_source: str = "backbone") -> None:
        super().__init__(cfg)
        if backbone_state is not None:
            load_backbone_weights(self.backbone, backbone_state, backbone_source)
        if self.cfg.model.get("num_classes") is None:
            raise ValueError("model.num_classes must be set (the runner takes it from the data)")
        self.num_classes = int(self.cfg.model.num_classes)
        names = self.cfg.data.get("class_names")
        self.class_names: list[str] = list(names) if names else [str(k) for k in range(self.num_classes)]
        self.freeze_backbone = bool(self.cfg.model.get("freeze_backbone", False))
        self.history: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._fit_started: float | None = None

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def apply_backbone_freeze(self) -> None:
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> FinetuneModule:
        """As nn.Module.train, but a frozen backbone stays in eval mode (its BN statistics are not updated)."""
        super().train(mode)
        if getattr(self, "freeze_backbone", False):
            self.backbone.eval()
        return self

    # ---- evaluation record --------------------------------------------------------------------
    def history_file(self) -> Path | None:
        return Path(self.trainer.default_root_dir) / "history.json" if self._trainer is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the evaluation history in the checkpoint, so a resumed run's history.json is complete."""
        checkpoint["finetune_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the history: the checkpoint's, plus evaluations that ran after it was written at the
        same step (a step checkpoint is saved before that step's validation) from the run's history.json."""
        super().on_load_checkpoint(checkpoint)
        step = int(checkpoint.get("global_step", 0))
        merged = {int(h["step"]): h for h in checkpoint.get("finetune_history", [])}
        path = self.history_file()
        if path is not None and path.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                for h in json.loads(path.read_text()):
                    if int(h["step"]) <= step:
                        merged.setdefault(int(h["step"]), h)
        self.history = [merged[k] for k in sorted(merged)]

    def record(self, metrics: dict[str, Any]) -> None:
        """Store the metrics of this validation and log them (rank 0 values are global already)."""
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        self.results = metrics
        entry: dict[str, Any] = {"step": int(self.global_step), "metrics": metrics}
        if self._fit_started is not None:  # wall seconds since this process started fitting (curves vs time)
            entry["wall_s"] = round(time.perf_counter() - self._fit_started, 2)
        self.history.append(entry)
        path = self.history_file()
        if path is not None and self.trainer.is_global_zero and self.trainer.state.fn == "fit":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.history, indent=2) + "\n")  # kept current for crashes/resumes
        flat = flatten_metrics(metrics)
        for key, value in flat.items():
            self.log(f"val/{key}", value, prog_bar=key in ("bbox/AP", "mIoU", "top1"), rank_zero_only=True)

    def images_due(self) -> bool:
        """Whether to draw prediction images in this validation (rank 0, not in the sanity check)."""
        return (self._trainer is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking
                and int(self.cfg.logging.num_images) > 0)
