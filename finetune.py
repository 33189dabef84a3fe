#!/usr/bin/env python
"""Fine-tune and evaluate a backbone: `python finetune.py --task NAME --backbone PATH|scratch [options] [key=value ...]`.

Thin entry point: the registry (cheaplunch/registry.py) maps NAME to its LightningModule, DataModule and
default YAML; cheaplunch/finetune.py runs it. Run `python finetune.py --help` for the tasks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cheaplunch.cli import add_overrides_argument, add_run_arguments, config_flags, run_cli
from cheaplunch.registry import TASKS, describe, lookup
from common.errors import UserError
from models import DETECTORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a pre-trained (or randomly initialised) backbone on a downstream task and "
                    "evaluate it on the val split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "tasks:\n" + describe(TASKS) + "\n\n"
            "examples:\n"
            "  python finetune.py --task detection --detector retinanet --backbone runs/montage/backbone.pt\n"
            "  python finetune.py --task segmentation --backbone scratch --arch resnet18 --label-fraction 0.1\n"
            "  python finetune.py --task classification --backbone runs/montage model.freeze_backbone=true  # linear probe\n"
            "  python finetune.py --eval-only --checkpoint runs/finetune_detection/checkpoints/final.ckpt\n\n"
            "The run folder (--out) gets config.yaml, checkpoints/, results.json (final metrics), history.json\n"
            "(metrics at every evaluation) and images/. Any config key can be overridden as key=value."
        ),
    )
    parser.add_argument("--task", metavar="NAME", help=f"fine-tuning task: {', '.join(sorted(TASKS))}")
    parser.add_argument("--detector", metavar="NAME", help=f"detection only: {' | '.join(DETECTORS)}")
    parser.add_argument("--backbone", metavar="PATH|scratch",
                        help="initial backbone: an exported backbone.pt (or its folder), a Lightning .ckpt of "
                             "any pre-training run, or 'scratch' (random init); default: model.backbone (scratch)")
    parser.add_argument("--arch", metavar="NAME", help="timm architecture (default: the one recorded with the "
                                                        "backbone, else model.arch)")
    add_run_arguments(parser, default_out="runs/finetune_<task>",
                      seed_help="random seed (init of new layers, sampling, augmentation)")
    parser.add_argument("--label-fraction", type=float, metavar="F",
                        help="train on a deterministic, nested fraction F of the labelled training images")
    parser.add_argument("--label-count", type=int, metavar="N", help="train on N labelled training images (nested)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the val split and exit")
    parser.add_argument("--checkpoint", metavar="CKPT", help="with --eval-only: a finetune.py checkpoint")
    add_overrides_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.task is not None:
            lookup(TASKS, args.task, "task")  # fail fast, before the heavy imports
        elif not args.eval_only:
            raise UserError(f"--task is required (choices: {', '.join(sorted(TASKS))})")
        from cheaplunch.finetune import run_finetune

        run_finetune(args.task, backbone=args.backbone, arch=args.arch, config=args.config,
                     out=Path(args.out) if args.out else None, resume=args.resume, eval_only=args.eval_only,
                     checkpoint=args.checkpoint, overrides=args.overrides, **config_flags(args))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
