#!/usr/bin/env python
"""Pre-train a backbone: `python train.py --method NAME [options] [key=value ...]`.

Thin entry point: the registry (cheaplunch/registry.py) maps NAME to its LightningModule, DataModule
and default YAML; cheaplunch/runner.py builds the run. Run `python train.py --help` for the methods.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cheaplunch.cli import add_overrides_argument, add_run_arguments, config_flags, run_cli
from cheaplunch.registry import METHODS, describe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Pre-train a vision backbone on your own data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "methods:\n" + describe(METHODS) + "\n\n"
            "Any config key can be overridden as key=value, e.g.\n"
            "  python train.py --method montage trainer.max_steps=20 data.batch_size=8\n"
            "The run folder (--out) gets config.yaml, checkpoints/last.ckpt, backbone.pt and backbone.json;\n"
            "re-running the same command resumes from its last checkpoint."
        ),
    )
    parser.add_argument("--method", required=True, metavar="NAME", help="pre-training method (see below)")
    add_run_arguments(parser, default_out="runs/<method> (runs/<method>-<job id> under SLURM)",
                      seed_help="random seed (data building, sampling, init)")
    parser.add_argument("--preview", type=int, metavar="N",
                        help="write N example batches as PNG + JSON into <out>/preview and exit")
    add_overrides_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from cheaplunch.pretrain import run_pretraining

        run_pretraining(args.method, config=args.config, out=Path(args.out) if args.out else None,
                        resume=args.resume, preview=args.preview, overrides=args.overrides, **config_flags(args))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
