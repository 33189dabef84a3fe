"""Callbacks that write run artifacts: the exported backbone, and a per-rank audit (for DDP tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class ExportBackbone(Callback):
    """Writes `backbone.pt` + `backbone.json` into the run folder when training ends (rank 0).

    With EMA enabled, Lightning's EMAWeightAveraging has swapped the averaged weights in by then, so
    the EMA weights are the ones exported."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = pl_module.export_backbone(self.out_dir)
            print(f"exported backbone -> {path}")


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers, bitwise (identical weights <=> identical hash)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
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
            "weights_sha256": state_hash(pl_module),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
