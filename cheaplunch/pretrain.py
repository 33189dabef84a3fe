"""`train.py` behind the CLI: resolve the method, config and run folder, then fit."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from cheaplunch.config import load_config
from cheaplunch.errors import UserError
from cheaplunch.registry import METHODS, lookup
from cheaplunch.runner import (
    apply_cli_overrides,
    apply_slurm_environment,
    build_trainer,
    default_run_dir,
    find_resume_checkpoint,
    log_config,
    make_logger,
    standard_callbacks,
    write_run_config,
)
from lightning_modules.base import NonFiniteLossError


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
    job = apply_slurm_environment(cfg, devices=devices, num_nodes=num_nodes)
    run_dir = (out or default_run_dir(method, job)).resolve()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = entry.datamodule_class().from_config(cfg)

    if preview is not None:
        if not hasattr(datamodule, "write_preview"):
            raise UserError(f"--preview: method '{method}' has no preview")
        paths = datamodule.write_preview(run_dir / "preview", preview)
        rank_zero_info(f"wrote {len(paths)} previews to {run_dir / 'preview'}")
        return run_dir

    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, run_dir)
    module = entry.module_class()(cfg)
    pl_logger = make_logger(str(cfg.logging.logger), run_dir, cfg)
    log_config(pl_logger, cfg)
    trainer = build_trainer(cfg, run_dir, standard_callbacks(cfg, run_dir, export=True), pl_logger)
    ckpt = find_resume_checkpoint(run_dir, resume)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except NonFiniteLossError as exc:
        raise UserError(str(exc)) from exc
    rank_zero_info(f"run folder: {run_dir}")
    return run_dir
