"""Command-line pieces shared by train.py and finetune.py (kept import-light so `--help` is fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags that are plain config keys, as ``key=value`` overrides (explicit ones given after win)."""
    return [f"data.cache_dir={args.cache_dir}"] if getattr(args, "cache_dir", None) else []


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
