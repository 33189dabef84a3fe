#!/usr/bin/env python
"""Compare backbone initialisations downstream: fine-tune each with the same task, data, schedule and
seed(s), then write a markdown table and a plot of the metric against the fine-tuning step.

    python benchmarks/compare_pretraining.py --task detection --detector faster_rcnn \\
        --init montage=runs/montage/backbone.pt --init scratch=scratch [--seeds 0 1] [key=value ...]

Each ``--init NAME=SPEC`` is a ``--backbone`` spec (exported backbone, its folder, a Lightning checkpoint,
or ``scratch``). ``scratch`` gets the architecture of the other inits, so every run has the same model.
Runs go to ``runs/compare/<task>/<name>/seed<k>``; a finished run (its results.json present) is reused
unless ``--force``. Outputs, in ``--results`` (default ``benchmarks/results``):

- ``compare_<tag>.md``: the command, the settings, one row per init (final metrics, mean +- std over
  seeds when several), and the metric at every evaluation step;
- ``compare_<tag>.png``: the headline metric vs fine-tuning step, one line per init (mean over seeds);
- ``compare_<tag>.json``: everything above, machine-readable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.errors import UserError  # noqa: E402

# The metric plotted per task, and the columns of the table (paths into results.json).
HEADLINE = {"detection": "bbox/AP", "segmentation": "mIoU", "classification": "top1"}
COLUMNS = {
    "detection": ["bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl"],
    "segmentation": ["mIoU"],
    "classification": ["top1", "top5"],
}
MASK_COLUMNS = ["segm/AP", "segm/AP50", "segm/AP75"]


def lookup(metrics: dict[str, Any], path: str) -> float | None:
    """'bbox/AP' -> metrics['bbox']['AP'] (None when absent)."""
    value: Any = metrics
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return None if value is None else float(value)


@dataclass
class InitRuns:
    name: str
    spec: str
    arch: str = ""
    norm: str = ""  # backbone normalisation used (detection: frozen BN, but trainable BN from scratch)
    results: list[dict[str, Any]] = field(default_factory=list)  # one per seed
    histories: list[list[dict[str, Any]]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def parse_inits(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise UserError(f"--init must be NAME=SPEC (e.g. montage=runs/montage/backbone.pt), got '{item}'")
        pairs.append((name, spec))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"--init names must be distinct, got {names}")
    return pairs


def common_arch(pairs: list[tuple[str, str]], arch: str | None) -> str | None:
    """The architecture every init must share: --arch, else the one recorded with the pre-trained inits."""
    from models.backbone_loading import SCRATCH, resolve_backbone

    archs = {name: resolve_backbone(spec, arch).arch for name, spec in pairs if spec != SCRATCH}
    if len(set(archs.values())) > 1:
        raise UserError(f"the inits have different architectures {archs}; pass --arch to force one")
    return arch or next(iter(archs.values()), None)


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if any(v < 0 for v in vals):
        return "-1 (no GT)"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def mean_curve(histories: list[list[dict[str, Any]]], metric: str) -> tuple[list[int], list[float]]:
    """Mean of `metric` over seeds at each step evaluated by every seed."""
    steps = sorted(set.intersection(*({h["step"] for h in hist} for hist in histories))) if histories else []
    values = []
    for step in steps:
        vals = [lookup(next(h for h in hist if h["step"] == step)["metrics"], metric) for hist in histories]
        values.append(statistics.mean(v for v in vals if v is not None))
    return steps, values


def write_plot(path: Path, runs: list[InitRuns], metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in runs:
        steps, values = mean_curve(r.histories, metric)
        ax.plot(steps, [100 * v for v in values], marker="o", label=f"{r.name} ({r.arch})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown(path: Path, runs: list[InitRuns], task: str, columns: list[str], metric: str,
                   command: str, settings: dict[str, Any], png: Path) -> None:
    seeds = settings["seeds"]
    lines = [
        f"# Pre-training comparison: {task}",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        f"Metrics in % on the val split, final weights{' (mean ± std over seeds)' if len(seeds) > 1 else ''}.",
        "",
        "| init | backbone | arch | norm | " + " | ".join(columns) + " | minutes / run |",
        "|---|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for r in runs:
        cells = [fmt([lookup(res, c) for res in r.results]) for c in columns]
        minutes = statistics.mean(r.seconds) / 60 if r.seconds else float("nan")
        lines.append(f"| {r.name} | `{r.spec}` | {r.arch} | {r.norm} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    lines += ["", f"{metric} (%) at each evaluation step (mean over seeds):", ""]
    all_steps = sorted({s for r in runs for s in mean_curve(r.histories, metric)[0]})
    lines.append("| init | " + " | ".join(str(s) for s in all_steps) + " |")
    lines.append("|---|" + "---|" * len(all_steps))
    for r in runs:
        curve = dict(zip(*mean_curve(r.histories, metric)))
        lines.append(f"| {r.name} | " + " | ".join(f"{100 * curve[s]:.1f}" if s in curve else "" for s in all_steps) + " |")
    lines += ["", f"![{metric} vs step]({png.name})", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="detection", choices=sorted(HEADLINE))
    parser.add_argument("--detector", default=None, help="detection: retinanet | faster_rcnn | mask_rcnn")
    parser.add_argument("--init", action="append", required=True, metavar="NAME=SPEC",
                        help="a backbone to compare (repeat); SPEC as finetune.py --backbone")
    parser.add_argument("--arch", default=None, help="force the architecture of every init")
    parser.add_argument("--data", default=None, help="dataset (default: the embedded one)")
    parser.add_argument("--config", default=None, help="YAML over the task's defaults, for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--label-fraction", type=float, default=None)
    parser.add_argument("--tag", default=None, help="output name (default: <task>[_<detector>])")
    parser.add_argument("--runs", default=str(REPO / "runs" / "compare"), help="where the runs go")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the table/plot go")
    parser.add_argument("--logger", default="csv", choices=("wandb", "csv", "none"))
    parser.add_argument("--force", action="store_true", help="re-run finished runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    try:
        from cheaplunch.finetune import run_finetune

        pairs = parse_inits(args.init)
        arch = common_arch(pairs, args.arch)
        tag = args.tag or (args.task + (f"_{args.detector}" if args.detector else ""))
        runs: list[InitRuns] = []
        for name, spec in pairs:
            r = InitRuns(name, spec)
            for seed in args.seeds:
                out = Path(args.runs) / tag / name / f"seed{seed}"
                if args.force or not (out / "results.json").is_file():
                    start = time.time()
                    run_finetune(args.task, backbone=spec, detector=args.detector, arch=arch, data=args.data,
                                 config=args.config, logger=args.logger, seed=seed, out=out, resume="never",
                                 label_fraction=args.label_fraction, overrides=list(args.overrides))
                    (out / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
                r.results.append(json.loads((out / "results.json").read_text()))
                r.histories.append(json.loads((out / "history.json").read_text()))
                if (out / "wall_seconds.txt").is_file():
                    r.seconds.append(float((out / "wall_seconds.txt").read_text()))
                from omegaconf import OmegaConf

                run_cfg = OmegaConf.load(out / "config.yaml")
                r.arch, r.norm = str(run_cfg.model.arch), str(run_cfg.model.get("norm", ""))
            runs.append(r)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    columns = list(COLUMNS[args.task])
    if args.detector == "mask_rcnn":
        columns += MASK_COLUMNS
    metric = HEADLINE[args.task]
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    md, png, js = (results_dir / f"compare_{tag}{ext}" for ext in (".md", ".png", ".json"))
    command = "python benchmarks/compare_pretraining.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    settings = {"task": args.task, "detector": args.detector, "data": args.data or "embedded", "seeds": args.seeds,
                "label_fraction": args.label_fraction, "overrides": list(args.overrides)}
    write_plot(png, runs, metric, f"{tag}: {', '.join(r.name for r in runs)}")
    write_markdown(md, runs, args.task, columns, metric, command, settings, png)
    js.write_text(json.dumps({"command": command, "settings": settings, "runs": [r.__dict__ for r in runs]}, indent=2))
    print(md.read_text())
    print(f"wrote {md}, {png}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
