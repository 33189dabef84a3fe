#!/usr/bin/env python
"""Which pre-training buys the most detection / segmentation quality per unit of compute on your data?

    python bakeoff.py [--data DIR] [--methods montage fcmae contrastive supervised scratch] \\
        [--task detection|segmentation|both] [--seeds 3] [--budget 3e15|500steps] \\
        [--label-fractions 0.1 1.0] [--init NAME=PATH ...] [--no-controls] [--out DIR] [--dry-run]

See cheaplunch/bakeoff.py for the design (probes, equal total compute, paired verdicts).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cheaplunch.bakeoff import CONTROL_METHODS, Settings
from cheaplunch.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bakeoff.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pre-train with each method at the same measured compute, fine-tune every backbone and "
                    "scratch on your detection / segmentation data over several seeds, and say which wins "
                    "(mean, 95% interval, verdict from the seed-paired difference to scratch at equal total "
                    "compute).",
        epilog="Outputs in --out: bakeoff.md, bakeoff.json, bakeoff.png, a W&B run, and one folder per run.\n"
               "Re-running the same command reuses finished runs and resumes interrupted ones.")
    parser.add_argument("--data", metavar="DIR",
                        help="dataset (default: the embedded real-photo set of configs/bakeoff/data.yaml, built "
                             "once into data/)")
    parser.add_argument("--methods", nargs="+", default=["montage", "fcmae", "contrastive", "supervised", "scratch"],
                        metavar="NAME", help="arms: montage fcmae contrastive supervised scratch (default: all)")
    parser.add_argument("--task", default="both", choices=("detection", "segmentation", "both"))
    parser.add_argument("--detector", default=None,
                        help="retinanet | faster_rcnn | mask_rcnn (default: the protocol's, configs/bakeoff/detection.yaml)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm (default 3)")
    parser.add_argument("--budget", default="200steps",
                        help="pre-training compute, the same for every method: FLOPs (e.g. 3e15), or steps (e.g. "
                             "500steps) of the first method listed, whose FLOPs every other method then gets in its "
                             "own steps (default 200steps)")
    parser.add_argument("--label-fractions", type=float, nargs="+", default=[1.0], metavar="F",
                        help="fractions of the labelled images to fine-tune on (a nested subset); label-using "
                             "methods also pre-train on it")
    parser.add_argument("--init", action="append", default=[], metavar="NAME=PATH",
                        help="an extra arm: an exported backbone or checkpoint you have (repeatable)")
    parser.add_argument("--out", default="runs/bakeoff", help="bake-off folder (default runs/bakeoff)")
    parser.add_argument("--logger", default="none", choices=("wandb", "csv", "none"),
                        help="logger of every run; the bake-off's own W&B run is written unless 'none'")
    parser.add_argument("--launcher", default="local", choices=("local", "slurm"),
                        help="local: one run at a time here (default); slurm: every run its own sbatch job, a "
                             "fine-tuning after its pre-training, collected when all finish")
    parser.add_argument("--sbatch-args", default="", metavar="'ARGS'",
                        help="extra sbatch options for every job with --launcher slurm, e.g. "
                             "'--partition gpu --gpus-per-node 1 --time 4:00:00'")
    parser.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                        help="the protocol's controls (default on): a positive control (--control-method pre-trained "
                             "for --control-factor x the budget on every label, must beat scratch by > 3 seed SDs) "
                             "and a negative one (scratch with other seeds, must tie with scratch)")
    parser.add_argument("--control-method", default=Settings.control_method, choices=CONTROL_METHODS,
                        help="pre-training of the positive control, on the default architecture: a method, or "
                             "detection (the detection protocol trained from scratch; its backbone is fine-tuned "
                             f"again) (default {Settings.control_method})")
    parser.add_argument("--control-factor", type=float, default=Settings.control_factor,
                        help="the positive control's pre-training in budgets; with a budget in steps, in its own "
                             f"steps (default {Settings.control_factor:g})")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every checkpoint of finished runs (by default a fine-tuning's are deleted once it "
                             "is done, about 1 GB each, and a pre-training keeps only last.ckpt and backbone.pt)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the 8-step probes, print the plan with each arm's measured cost and the "
                             "estimated total, and stop")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every fine-tuning run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from cheaplunch.bakeoff import TASKS, BakeOff, default_data, parse_budget, parse_inits
        from cheaplunch.bakeoff_launch import execute, execute_slurm
        from cheaplunch.bakeoff_report import log_wandb, write_json, write_markdown, write_plot
        from cheaplunch.bakeoff_run import PROBE_STEPS

        out = Path(args.out).resolve()
        data = str(Path(args.data).expanduser().resolve()) if args.data else str(default_data())  # runs start in the repo
        s = Settings(data=data, methods=list(args.methods),
                     tasks=list(TASKS) if args.task == "both" else [args.task], seeds=args.seeds,
                     budget=parse_budget(args.budget), label_fractions=sorted(set(args.label_fractions)),
                     inits=parse_inits(args.init), out=out, logger=args.logger, detector=args.detector,
                     overrides=list(args.overrides), controls=args.controls, control_method=args.control_method,
                     control_factor=args.control_factor)
        bake = BakeOff(s)

        def run_all(runs, estimate=None) -> None:
            if args.launcher == "slurm":
                execute_slurm(runs, shlex.split(args.sbatch_args), group=out.name,
                              keep_checkpoints=args.keep_checkpoints)
            else:
                execute(runs, estimate=estimate, group=out.name, keep_checkpoints=args.keep_checkpoints)

        probes = bake.probes()
        print(f"probing {len(probes)} runs ({PROBE_STEPS} steps each) for their cost per step ...")
        run_all(probes)
        by_key = {p.key: p for p in probes}
        runs, info = bake.plan(by_key)
        seconds = {r.key: bake.seconds(r, by_key) for r in runs}
        todo = [r for r in runs if not r.done()]
        print(f"{len(runs)} runs ({len(runs) - len(todo)} done); estimated {sum(seconds[r.key] for r in todo) / 60:.0f} "
              "min left (start-up, steps, waits for data and validations, as the probes measured them)")
        if args.dry_run:
            for r in runs:
                flops, step = bake.per_step(by_key[r.probe])
                print(f"  {'done ' if r.done() else ''}{r.key}: {r.steps} steps x {flops:.3g} FLOPs, {step:.2f} s/step"
                      f"{f', validated every {r.val_every}' if r.val_every else ''}: ~{seconds[r.key] / 60:.1f} min")
            print("budget arithmetic: " + str(info))
            return
        run_all(runs, estimate=lambda r: seconds[r.key])
        rows = bake.results(runs)
        command = "python bakeoff.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        write_plot(out / "bakeoff.png", rows, s)
        write_markdown(out / "bakeoff.md", rows, s, command, info)
        write_json(out / "bakeoff.json", rows, s, command, info)
        if args.logger != "none":
            log_wandb(out, rows, s, group=out.name)
        print((out / "bakeoff.md").read_text())

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
