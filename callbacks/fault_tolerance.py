"""Keep `checkpoints/last.ckpt` current and stop cleanly when asked to, so that re-running the same
command (or a SLURM requeue) continues exactly where the run stopped.

- `last.ckpt` is written every N steps and at the end of training.
- SIGTERM (and Ctrl+C): Lightning raises `SIGTERMException` after the current batch; we save `last.ckpt`
  and the process exits with status 0.
- SIGUSR1 (what `sbatch --signal=SIGUSR1@120` and `scancel --signal=USR1` send): the request is noted by
  the handler and acted on at the end of the current batch, on every rank together (an all-reduce of the
  flag), so the checkpoint always holds a whole optimizer step: `last.ckpt` is saved, rank 0 requeues the
  SLURM job (`scontrol requeue`) when there is one, and training stops. (Lightning's own SLURM handler
  saves from inside the signal handler, possibly in the middle of a step; we do not use it.)
- A non-finite loss is *not* checkpointed: the last good checkpoint stays the newest one.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cheaplunch import slurm


class CheckpointOnInterrupt(Callback):
    """The one writer of `last.ckpt`: every `every_n_steps` optimizer steps, at the end of training, and
    when interrupted (ModelCheckpoint keeps the numbered `step*.ckpt` snapshots)."""

    def __init__(self, checkpoint_path: Path | str, every_n_steps: int = 0) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.every_n_steps = every_n_steps
        self._previous_usr1 = None
        self._usr1_received = False
        self._saved_at_step: int | None = None

    # ---- signal plumbing --------------------------------------------------------------------------
    def _on_usr1(self, signum: int, frame: object) -> None:
        self._usr1_received = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(signal, "SIGUSR1"):
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _restore_handler(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    # ---- saving -------------------------------------------------------------------------------------
    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.checkpoint_path)
        self._saved_at_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)
        if not trainer.strategy.reduce_boolean_decision(self._usr1_received, all=False):
            return
        self._usr1_received = False
        self._save(trainer)
        job = slurm.detect()
        rank_zero_info(f"SIGUSR1 at step {trainer.global_step}: saved {self.checkpoint_path}"
                       + (f"; requeueing SLURM job {job.job_id}" if job else "; run the same command again to resume"))
        if job is not None and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True)
            if result.returncode != 0:
                rank_zero_warn(f"scontrol requeue {job.job_id} failed: {result.stderr.strip()}")
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self._save(trainer)
            rank_zero_info(f"interrupted at step {trainer.global_step}: saved {self.checkpoint_path}; "
                           "run the same command again to resume")
