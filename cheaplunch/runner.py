"""Shared run logic behind train.py and finetune.py: config, run folder, loggers, callbacks, Trainer.

Kept out of the entry scripts so that tests can call every piece."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig

from callbacks.compute import ComputeMeter
from callbacks.fault_tolerance import (
    CheckpointOnInterrupt,
    SafeCheckpointIO,
    check_resume_checkpoint,
    newest_good_checkpoint,
    remove_stray_temporaries,
)
from callbacks.lr_schedule import WarmupCosineLR
from callbacks.run_artifacts import ExportBackbone, RankAudit
from cheaplunch.config import save_config, to_dict
from common import slurm
from common.errors import UserError
from common.files import writable_folder
from common.paths import REPO_ROOT
from lightning_modules.base import NonFiniteLossError, batch_size_of

log = logging.getLogger("cheaplunch")

LOGGERS = ("wandb", "csv", "none")


def default_run_dir(name: str, job: slurm.SlurmJob | None = None) -> Path:
    """A stable run folder (the same for every process and every restart) so that resuming works:
    `runs/<name>`, or `runs/<name>-<job id>` under SLURM (a requeued job keeps its id)."""
    return REPO_ROOT / "runs" / (f"{name}-{job.job_id}" if job is not None else name)


def apply_slurm_environment(cfg: DictConfig) -> slurm.SlurmJob | None:
    """Under SLURM: take trainer.devices / num_nodes from the job (a value the config sets, by a YAML,
    key=value or --devices / --num-nodes, must agree) and make sure MASTER_ADDR is set. Returns the job,
    or None outside SLURM."""
    job = slurm.detect()
    if job is None:
        return None
    for key, value in slurm.trainer_overrides(job, cfg.trainer.devices, cfg.trainer.num_nodes).items():
        cfg.trainer[key] = value
    slurm.ensure_master_addr(job)
    rank_zero_info(f"SLURM job {job.job_id}: {job.num_nodes} node(s) x {job.tasks_per_node} task(s)")
    return job


def wandb_mode() -> str:
    """'online' when an API key is configured (env or ~/.netrc), else 'offline'. WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def make_logger(kind: str, run_dir: Path, cfg: DictConfig) -> Logger | bool:
    if kind not in LOGGERS:
        raise UserError(f"--logger must be one of {', '.join(LOGGERS)}, got '{kind}'")
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    mode = wandb_mode()
    if mode == "offline":
        rank_zero_info(f"W&B: no API key configured, logging offline to {run_dir}/wandb "
                       "(sync later with `wandb sync`)")
    logger = WandbLogger(project=cfg.logging.project, name=cfg.logging.run_name or run_dir.name,
                         save_dir=str(run_dir), offline=mode == "offline", id=_persistent_wandb_id(run_dir),
                         resume="allow")  # a resumed or requeued run continues the same W&B run
    return logger


def _persistent_wandb_id(run_dir: Path) -> str:
    """The W&B run id, kept in the run folder so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: short lowercase alphanumerics
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def standard_callbacks(cfg: DictConfig, run_dir: Path, *, export: bool) -> list[Callback]:
    """Checkpointing, LR schedule, throughput, EMA, export and audit, as configured."""
    s = cfg.schedule
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(cfg.checkpoint.every_n_steps), save_last=False, save_top_k=-1),
        WarmupCosineLR(
            base_lr=None, name=s.name, warmup_steps=int(s.warmup_steps), warmup_epochs=s.warmup_epochs,
            warmup_start_factor=float(s.warmup_start_factor), min_lr_factor=float(s.min_lr_factor),
            milestones=list(s.milestones), gamma=float(s.gamma),
        ),
        ThroughputMonitor(batch_size_fn=batch_size_of),
    ]
    if cfg.ema.enabled:
        callbacks.append(EMAWeightAveraging(decay=float(cfg.ema.decay)))
    if export:
        callbacks.append(ExportBackbone(run_dir))
    if cfg.logging.audit_ranks:
        callbacks.append(RankAudit(run_dir / "audit"))
    if int(cfg.logging.flops_steps) > 0:
        callbacks.append(ComputeMeter(run_dir / "compute.json", count=int(cfg.logging.flops_steps)))
    # Last: it saves the state the others leave after a step (the EMA's update of that step included); Lightning
    # moves only its own Checkpoint callbacks to the end of the list.
    callbacks.append(CheckpointOnInterrupt(run_dir / "checkpoints" / "last.ckpt",
                                           every_n_steps=int(cfg.checkpoint.every_n_steps)))
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback], logger: Logger | bool) -> L.Trainer:
    torch.set_float32_matmul_precision(str(cfg.runtime.matmul_precision))
    trainer_kwargs = to_dict(cfg.trainer)
    for key in ("devices", "num_nodes"):  # null: not set (under SLURM: the job's, see apply_slurm_environment)
        if trainer_kwargs.get(key) is None:
            trainer_kwargs[key] = 1
    processes = int(trainer_kwargs["devices"]) * int(trainer_kwargs["num_nodes"])
    if processes > 1 and trainer_kwargs.get("strategy") == "auto":
        trainer_kwargs["strategy"] = "ddp"  # not Lightning's spawn-based default on CPU
    plugins: list = [SafeCheckpointIO()]  # never a non-finite checkpoint; temporary file + rename
    if slurm.detect() is not None:
        # Ranks and world size from SLURM. Requeueing on SIGUSR1 is done by callbacks.fault_tolerance
        # (at a step boundary), not by Lightning's handler (which saves from inside the signal handler).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        return L.Trainer(default_root_dir=str(run_dir), callbacks=list(callbacks), logger=logger, plugins=plugins,
                         **trainer_kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad trainer settings in the config ({exc})") from exc


def make_run_dir(run_dir: Path) -> Path:
    """Create the run folder and check that it takes files, before any data is read: a read-only or
    impossible ``--out`` is one line, not a traceback at the first checkpoint."""
    return writable_folder(run_dir, "the run folder", "choose another --out")


def find_resume_checkpoint(run_dir: Path, resume: str) -> str | None:
    """'auto': continue from checkpoints/last.ckpt when the run folder has one (also what a requeued
    SLURM job finds); 'never': start fresh; otherwise a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            rank_zero_info(f"resuming from {last} (pass --resume never or another --out to start fresh)")
            return str(last)
        return None
    if not Path(resume).is_file():
        raise UserError(f"--resume: checkpoint not found: {resume}")
    return resume


@rank_zero_only
def write_run_config(cfg: DictConfig, run_dir: Path) -> None:
    save_config(cfg, run_dir / "config.yaml")


def log_config(logger: Logger | bool, cfg: DictConfig) -> None:
    if isinstance(logger, Logger):
        logger.log_hyperparams(to_dict(cfg))


def fit_in_run_dir(cfg: DictConfig, run_dir: Path, module: L.LightningModule, datamodule: L.LightningDataModule,
                   *, resume: str, export: bool) -> L.Trainer:
    """The common body of a training run: logger, standard callbacks, Trainer, resume, fit. A non-finite
    loss becomes a one-line UserError (the last good checkpoint stays in the run folder)."""
    pl_logger = make_logger(str(cfg.logging.logger), run_dir, cfg)
    log_config(pl_logger, cfg)
    trainer = build_trainer(cfg, run_dir, standard_callbacks(cfg, run_dir, export=export), pl_logger)
    if trainer.is_global_zero:
        for stray in remove_stray_temporaries(run_dir / "checkpoints"):
            rank_zero_info(f"removed {stray}, left by a checkpoint write that was cut short")
    ckpt = find_resume_checkpoint(run_dir, resume)
    if ckpt is not None:
        check_resume_checkpoint(Path(ckpt))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except NonFiniteLossError as exc:
        good = newest_good_checkpoint(run_dir / "checkpoints")
        where = (f"the newest good checkpoint is {good}: lower optim.lr and add --resume {good} to continue from "
                 "it" if good is not None else "no checkpoint was written before it")
        raise UserError(f"{exc}; {where}") from exc
    return trainer
