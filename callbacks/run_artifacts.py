"""Callbacks that write run artifacts: the exported backbone, and a per-rank audit (for DDP tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging


class ExportBackbone(Callback):
    """Writes `backbone.pt` + `backbone.json` into the run folder when fit ends (rank 0): also when a run
    resumed from a checkpoint at its last step skips the training loop.

    With EMA enabled, the averaged weights are the ones exported (`averaged_module`)."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            # the step from the trainer: an EMA copy has none of its own
            path = averaged_module(trainer, pl_module).export_backbone(self.out_dir, global_step=trainer.global_step)
            print(f"exported backbone -> {path}")


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of the module when a WeightAveraging callback keeps one, else the module. After a full loop the
    two hold the same weights; a run resumed at its last step skips the loop end where Lightning copies the
    average into the module."""
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        if average is not None:
            return average.module
    return pl_module


BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def state_hash(module: torch.nn.Module, *, parameters_only: bool = False, skip_bn_statistics: bool = False) -> str:
    """SHA-256 of the parameters (and buffers unless parameters_only), bitwise: identical <=> same hash."""
    digest = hashlib.sha256()
    tensors = dict(module.named_parameters()) if parameters_only else module.state_dict()
    if skip_bn_statistics:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(BN_STATISTICS)}
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankAudit(Callback):
    """Records the dataset indices each rank trained on and, at the end, a hash of its weights,
    into `<run>/audit/rank<k>.json` (enabled with logging.audit_ranks=true)."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)
        self.indices: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        index = getattr(batch, "index", None)
        if index is not None:
            self.indices.extend(int(i) for i in index)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "indices": self.indices,
            # Parameters are synchronised by DDP; BatchNorm running statistics are per process (DDP
            # broadcasts rank 0's buffers before each forward), so they are hashed separately.
            "weights_sha256": state_hash(pl_module, parameters_only=True),
            "state_sha256": state_hash(pl_module),
            "synced_state_sha256": state_hash(pl_module, skip_bn_statistics=True),  # e.g. ERF weights
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
