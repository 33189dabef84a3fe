"""`train.py` behind the CLI: resolve the method, config and run folder, then fit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from cheaplunch.checks import check_config
from cheaplunch.cli import flag_overrides
from cheaplunch.config import load_config
from cheaplunch.registry import METHODS, Entry, lookup
from cheaplunch.runner import (
    apply_slurm_environment,
    default_run_dir,
    fit_in_run_dir,
    make_run_dir,
    write_run_config,
)
from common.errors import UserError


def run_pretraining(
    method: str,
    *,
    config: str | None = None,
    out: Path | None = None,
    resume: str = "auto",
    preview: int | None = None,
    overrides: Sequence[str] = (),
    **flags: Any,
) -> Path:
    """Pre-train `method`; returns the run folder. ``flags`` are the config flags of the CLI (data=, seed=,
    logger=, devices=, ... see cheaplunch.cli.FLAG_KEYS), applied as overrides before ``overrides``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    entry = lookup(METHODS, method, "method")
    cfg = load_config(entry.config_path, config, flag_overrides(overrides, **flags))
    check_config(cfg)
    job = apply_slurm_environment(cfg)
    run_dir = make_run_dir((out or default_run_dir(method, job)).resolve())
    return pretrain(entry, cfg, run_dir, resume=resume, preview=preview)


def pretrain(entry: Entry, cfg: DictConfig, run_dir: Path, *, resume: str = "auto", preview: int | None = None) -> Path:
    """Fit `entry`'s LightningModule on its DataModule as `cfg` says, in `run_dir` (or with `preview`, only write
    that many example batches)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = entry.datamodule_class()(cfg)
    if preview is not None:
        if not hasattr(datamodule, "write_preview"):
            raise UserError(f"--preview: method '{entry.name}' has no preview")
        paths = datamodule.write_preview(run_dir / "preview", preview)
        rank_zero_info(f"wrote {len(paths)} previews to {run_dir / 'preview'}")
        return run_dir

    write_run_config(cfg, run_dir)
    module = entry.module_class()(cfg)
    fit_in_run_dir(cfg, run_dir, module, datamodule, resume=resume, export=True)
    rank_zero_info(f"run folder: {run_dir}")
    return run_dir
