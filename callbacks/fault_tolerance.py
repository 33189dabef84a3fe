"""Keep `checkpoints/last.ckpt` current and stop cleanly when asked to, so that re-running the same
command (or a SLURM requeue) continues exactly where the run stopped.

- `last.ckpt` is written every N steps and at the end of training.
- SIGTERM and SIGUSR1 (what `sbatch --signal=SIGUSR1@120` and `scancel --signal=USR1` send) are noted by
  their handlers (Lightning's for SIGTERM, ours for SIGUSR1) and acted on at the end of the current batch,
  on every rank together (one all-reduce of both flags), so the checkpoint always holds a whole optimizer
  step and a loop state Lightning resumes from exactly, also after an epoch's last batch: `last.ckpt` is
  saved and training stops (the process exits with status 0). After SIGUSR1, rank 0 also requeues the
  SLURM job (`scontrol requeue`) when there is one. (Lightning alone would save a SIGTERM from its
  exception path, at an epoch end after the epoch counter moved on, a state it then resumes into an empty
  epoch; its own SLURM handler saves from inside the signal handler, possibly mid-step. We use neither.)
- Ctrl+C (KeyboardInterrupt) saves `last.ckpt` from Lightning's exception path.
- A non-finite loss is *not* checkpointed, and no checkpoint whose weights, buffers or optimizer state hold
  NaN/inf is ever written (`SafeCheckpointIO`; BatchNorm statistics can blow up steps before the loss does):
  the last good checkpoint stays the newest one.
- Checkpoints are written to a temporary file in their own folder and renamed over the target, so a full
  disk or a crash mid-write leaves the previous file whole (Lightning's writer stages in /tmp and copies).
- A `last.ckpt` that cannot be read back (a write cut short by a crash or a full disk) is refused before
  training with one line that offers the newest intact `step*.ckpt` beside it (`check_resume_checkpoint`).
"""

from __future__ import annotations

import errno
import re
import signal
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from common import slurm
from common.errors import UserError
from common.files import TEMPORARY_INFIX, atomic_write

_STEP_CKPT = re.compile(r"step(\d+)(?:-v\d+)?\.ckpt")  # ModelCheckpoint's names (runner: filename="step{step:07d}")


def first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN/inf in a nest of dicts / lists (a state
    dict, optimizer states), or None when all are finite."""
    if isinstance(tree, torch.Tensor):
        return prefix or "tensor" if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


class SafeCheckpointIO(TorchCheckpointIO):
    """The checkpoint writer of every run (``Trainer(plugins=[SafeCheckpointIO()])``).

    - A checkpoint whose weights, buffers or optimizer state hold NaN/inf is not written (one warning
      per run), so `last.ckpt` and the step checkpoints always hold a state one can resume from.
    - The file is written to a temporary file in the target's folder, synced and renamed over the
      target: a full disk or a crash leaves the previous checkpoint whole, and the temporary is removed.
      A write that fails is a one-line UserError naming the file."""

    def __init__(self) -> None:
        super().__init__()
        self.refused_step: int | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        bad = first_non_finite({"state_dict": checkpoint.get("state_dict", {}),
                                "optimizer_states": checkpoint.get("optimizer_states", [])})
        if bad is not None:
            step = checkpoint.get("global_step")
            if self.refused_step is None:
                rank_zero_warn(f"{path}: not written at step {step}: {bad} holds NaN/inf (the previous checkpoint "
                               "stays the newest); lower optim.lr or check the data")
            self.refused_step = step
            return
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except OSError as exc:
            why = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            kept = "; the previous checkpoint there is intact" if path.is_file() else ""
            raise UserError(f"{path}: cannot write the checkpoint ({why}){kept}; free space or choose "
                            "another --out") from exc


def remove_stray_temporaries(directory: Path | str) -> list[Path]:
    """Delete the temporary files a killed ``SafeCheckpointIO`` write left in `directory`; returns them."""
    directory = Path(directory)
    stray = [p for p in directory.glob(f".*.ckpt{TEMPORARY_INFIX}*") if p.is_file()] if directory.is_dir() else []
    for p in stray:
        p.unlink(missing_ok=True)
    return stray


def newest_good_checkpoint(directory: Path | str) -> Path | None:
    """``last.ckpt`` when it is intact, else the newest intact step checkpoint; None when neither is."""
    last = Path(directory) / "last.ckpt"
    return last if is_intact_checkpoint(last) else newest_intact_step_checkpoint(directory, exclude=last)


def is_intact_checkpoint(path: Path | str) -> bool:
    """A whole torch checkpoint file: its zip archive's end record is there (a cut-short write lacks it).
    Reads only the end of the file; whether the model fits is checked when it is loaded."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


def newest_intact_step_checkpoint(directory: Path | str, exclude: Path | str | None = None) -> Path | None:
    """The ``step*.ckpt`` in `directory` with the highest step that is intact (newest file first on a tie),
    other than `exclude`; None if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for path in directory.iterdir():
        match = _STEP_CKPT.fullmatch(path.name)
        if match and (exclude is None or path.resolve() != Path(exclude).resolve()):
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    for _, _, path in sorted(found, reverse=True):
        if is_intact_checkpoint(path):
            return path
    return None


def check_resume_checkpoint(path: Path | str) -> None:
    """A one-line UserError naming `path` when the checkpoint to resume from is not a whole torch checkpoint
    (truncated, or another file), before Lightning fails on it with a traceback. The way out it offers:
    the newest intact step checkpoint beside it (``--resume PATH``) when there is one, else starting over."""
    path = Path(path)
    if is_intact_checkpoint(path):
        return
    newest = newest_intact_step_checkpoint(path.parent, exclude=path)
    way_out = (f"resume from the newest intact checkpoint with --resume {newest}, or pass --resume never to start "
               "over" if newest is not None else "pass --resume never to start over")
    raise UserError(f"{path}: cannot read the checkpoint to resume from (not a complete torch checkpoint: "
                    f"truncated, or another file); {way_out}, or another --out")


class CheckpointOnInterrupt(Callback):
    """The one writer of `last.ckpt`: every `every_n_steps` optimizer steps, at the end of training, and
    when interrupted (ModelCheckpoint keeps the numbered `step*.ckpt` snapshots)."""

    def __init__(self, checkpoint_path: Path | str, every_n_steps: int = 0) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.every_n_steps = every_n_steps
        self._previous_usr1 = None
        self._usr1_received = False
        self._saved_at_step: int | None = None
        self._interrupt_reported = False

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

    def _signals_on_any_rank(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(SIGUSR1, SIGTERM) received by any rank, from one all-reduce (every rank calls this each step)."""
        flags = torch.tensor([float(self._usr1_received), float(trainer.received_sigterm)],
                             device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)
        usr1, sigterm = self._signals_on_any_rank(trainer)
        if not (usr1 or sigterm):
            return
        self._usr1_received = False
        self._save(trainer)
        trainer.should_stop = True
        if sigterm:  # Lightning raises SIGTERMException after this hook or at the epoch end; nothing to add
            self._report_interrupt(trainer)
            return
        job = slurm.detect()
        rank_zero_info(f"SIGUSR1 at step {trainer.global_step}: saved {self.checkpoint_path}"
                       + (f"; requeueing SLURM job {job.job_id}" if job else "; run the same command again to resume"))
        if job is not None and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True)
            if result.returncode != 0:
                rank_zero_warn(f"scontrol requeue {job.job_id} failed: {result.stderr.strip()}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self._save(trainer)
            self._report_interrupt(trainer)

    def _report_interrupt(self, trainer: L.Trainer) -> None:
        if self._interrupt_reported:
            return
        self._interrupt_reported = True
        rank_zero_info(f"interrupted at step {trainer.global_step}: saved {self.checkpoint_path}; "
                       "run the same command again to resume")
