"""Keep `checkpoints/last.ckpt` current: write it when training ends (ModelCheckpoint only writes it every
N steps), and on SIGTERM / SIGUSR1 save it and exit cleanly, so that re-running the same command (or a
SLURM requeue) continues where the run stopped.

Lightning turns SIGTERM into a `SIGTERMException` raised after the current batch; this callback saves
the checkpoint when it (or Ctrl+C) arrives. Outside SLURM, SIGUSR1 is treated like SIGTERM (under SLURM,
Lightning's SLURMEnvironment handles SIGUSR1: it saves an `hpc_ckpt_*.ckpt` and requeues the job).
A non-finite loss is *not* checkpointed: the last good checkpoint stays the newest one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnInterrupt(Callback):
    def __init__(self, checkpoint_path: Path | str) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self._previous_usr1 = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if not isinstance(environment, SLURMEnvironment) and hasattr(signal, "SIGUSR1"):
            self._previous_usr1 = signal.signal(signal.SIGUSR1, _forward_to_sigterm)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        trainer.save_checkpoint(self.checkpoint_path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            trainer.save_checkpoint(self.checkpoint_path)
            rank_zero_info(f"interrupted at step {trainer.global_step}: saved {self.checkpoint_path}; "
                           "run the same command again to resume")

    def _restore_handler(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None


def _forward_to_sigterm(signum: int, frame: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
