"""`train.py` behind the CLI: resolve the method, config and run folder, then fit."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from cheaplunch.checks import check_config
from cheaplunch.config import load_config
from cheaplunch.registry import METHODS, lookup
from cheaplunch.runner import (
    apply_cli_overrides,
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
    data: str | None = None,
    config: str | None = None,
    logger: str | None = None,
    devices: int | None = None,
    num_nodes: int | None = None,
    seed: int | None = None,
    out: Path | None = None,
    resume: str = "auto",
    preview: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Path:
    """Pre-train `method`; returns the run folder."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    entry = lookup(METHODS, method, "method")
    cfg = load_config(entry.config_path, config, apply_cli_overrides(
        list(overrides), devices=devices, num_nodes=num_nodes, seed=seed, data=data))
    if logger is not None:
        cfg.logging.logger = logger
    check_config(cfg)
    job = apply_slurm_environment(cfg)
    run_dir = make_run_dir((out or default_run_dir(method, job)).resolve())
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = entry.datamodule_class().from_config(cfg)

    if preview is not None:
        if not hasattr(datamodule, "write_preview"):
            raise UserError(f"--preview: method '{method}' has no preview")
        paths = datamodule.write_preview(run_dir / "preview", preview)
        rank_zero_info(f"wrote {len(paths)} previews to {run_dir / 'preview'}")
        return run_dir

    write_run_config(cfg, run_dir)
    module = entry.module_class()(cfg)
    fit_in_run_dir(cfg, run_dir, module, datamodule, resume=resume, export=True)
    rank_zero_info(f"run folder: {run_dir}")
    return run_dir
