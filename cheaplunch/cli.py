"""Command-line pieces shared by train.py and finetune.py (kept import-light so `--help` is fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from common.errors import UserError


def add_run_arguments(parser: argparse.ArgumentParser, *, default_out: str, seed_help: str) -> None:
    """Options every run takes: data, config, logger, processes, seed, run folder, resume, overrides."""
    parser.add_argument("--data", metavar="PATH", help="dataset folder or YAML (default: the embedded real-photo set)")
    parser.add_argument("--config", metavar="FILE", help="YAML merged over the defaults")
    parser.add_argument("--logger", default=None, choices=("wandb", "csv", "none"),
                        help="wandb (default; offline without an API key), csv or none")
    parser.add_argument("--devices", type=int, metavar="N", help="processes (GPUs) per node (under SLURM: from the job)")
    parser.add_argument("--num-nodes", type=int, metavar="N", help="number of nodes (under SLURM: from the job)")
    parser.add_argument("--seed", type=int, metavar="S", help=seed_help)
    parser.add_argument("--out", metavar="DIR", help=f"run folder (default: {default_out})")
    parser.add_argument("--resume", default="auto", metavar="auto|never|CKPT",
                        help="auto: continue from the run folder's last.ckpt if present (default)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="folder for data derived from the dataset, e.g. montage sample banks (default: "
                             "$CHEAPLUNCH_CACHE or ~/.cache/cheaplunch); the dataset folder is never written")


# The flags that are config keys: option name -> dotted key. The one way a flag reaches the config is as a
# ``key=value`` override placed before the explicit ones (which win), for the CLI and the Python API alike.
FLAG_KEYS = {
    "data": "data.root",
    "cache_dir": "data.cache_dir",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "seed": "seed",
    "logger": "logging.logger",
    "detector": "model.detector",
    "label_fraction": "data.label_fraction",
    "label_count": "data.label_count",
}


def flag_overrides(overrides: Sequence[str] = (), **flags: Any) -> list[str]:
    """``flags`` (the options of FLAG_KEYS; None = not given) as dotted overrides, then ``overrides``."""
    unknown = sorted(set(flags) - set(FLAG_KEYS))
    if unknown:
        raise TypeError(f"not a config flag: {', '.join(unknown)} (known: {', '.join(FLAG_KEYS)})")
    return [f"{FLAG_KEYS[name]}={value}" for name, value in flags.items() if value is not None] + list(overrides)


def config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options that are config keys (FLAG_KEYS), as keyword arguments of run_pretraining / run_finetune."""
    return {name: value for name, value in vars(args).items() if name in FLAG_KEYS}


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def run_cli(body: Callable[[], object]) -> int:
    """Run `body`; a UserError becomes one line on stderr and exit status 2."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
