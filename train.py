#!/usr/bin/env python
"""Pre-train a backbone: `python train.py --method NAME [options] [key=value ...]`.

Thin entry point: the registry (cheaplunch/registry.py) maps NAME to its LightningModule, DataModule
and default YAML; cheaplunch/runner.py builds the run. Run `python train.py --help` for the methods.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cheaplunch.errors import UserError
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
    parser.add_argument("--data", metavar="PATH", help="dataset folder (default: the embedded real-photo set)")
    parser.add_argument("--config", metavar="FILE", help="YAML merged over the method's defaults")
    parser.add_argument("--logger", default=None, choices=("wandb", "csv", "none"),
                        help="wandb (default; offline without an API key), csv or none")
    parser.add_argument("--devices", type=int, metavar="N", help="processes (GPUs) per node")
    parser.add_argument("--num-nodes", type=int, metavar="N", help="number of nodes")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (data building, sampling, init)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<method>)")
    parser.add_argument("--resume", default="auto", metavar="auto|never|CKPT",
                        help="auto: continue from the run folder's last.ckpt if present (default)")
    parser.add_argument("--preview", type=int, metavar="N",
                        help="write N example batches as PNG + JSON into <out>/preview and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from cheaplunch.pretrain import run_pretraining

        run_pretraining(
            method=args.method, data=args.data, config=args.config, logger=args.logger,
            devices=args.devices, num_nodes=args.num_nodes, seed=args.seed,
            out=Path(args.out) if args.out else None, resume=args.resume, preview=args.preview,
            overrides=args.overrides,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
