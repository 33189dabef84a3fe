"""The bake-off's outputs: bakeoff.md (one row per arm and task), bakeoff.json, bakeoff.png (metric against
total compute, one line per method, error bars, one panel per task and label fraction) and a W&B run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cheaplunch.bakeoff import NEGATIVE_SEED_OFFSET, Settings, detector_of
from cheaplunch.bakeoff_verdicts import POSITIVE_MARGIN, ArmResult

METRIC_NAME = {"detection": "bbox AP", "segmentation": "mIoU"}


def _flops(x: float | None) -> str:
    return "n/a" if not x else f"{x:.3g}"


def _seconds(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 60:.1f} min"


def table_rows(rows: list[ArmResult]) -> list[list[str]]:
    out = []
    for r in rows:
        diff = r.vs_scratch_equal
        plain = r.vs_scratch_plain
        out.append([
            r.task, f"{r.fraction:g}", r.arm, r.arch or "?", _flops(r.pretrain_flops), _seconds(r.pretrain_seconds),
            _flops(r.finetune_flops), r.interval.format(scale=100), str(len(r.values)),
            diff.format(scale=100) if diff else "", plain.format(scale=100) if plain else "", r.verdict or "",
            "" if r.control is None else f"{r.control}: {'passed' if r.control_passed else 'FAILED'}",
        ])
    return out


def control_lines(rows: list[ArmResult], s: Settings) -> list[str]:
    """One sentence per control and panel: what it measured and whether the protocol passed it."""
    lines = []
    for r in (r for r in rows if r.control and r.vs_scratch_plain):
        where = f"{r.task}, {r.fraction:g} of the labels"
        diff = r.vs_scratch_plain.format(scale=100)
        if r.control == "positive":
            lines.append(f"- Positive control ({where}): {s.control_method} pre-training for {s.control_factor:g}x the "
                         f"budget minus scratch = {diff} (paired); needs a mean gain above {POSITIVE_MARGIN:g} x the "
                         f"seed SD (the larger of the control's and that of every scratch run, control_scratch included) = "
                         f"{100 * (r.control_threshold or 0.0):.2f}: "
                         f"**{'passed' if r.control_passed else 'FAILED: the protocol cannot see a real gain'}**.")
        else:
            lines.append(f"- Negative control ({where}): scratch with seeds {NEGATIVE_SEED_OFFSET}.. minus scratch = "
                         f"{diff} (paired), verdict {r.verdict}: "
                         f"**{'passed' if r.control_passed else 'FAILED: seeds alone gave a verdict'}**.")
    return lines


HEADER = ["task", "labels", "arm", "arch", "pre-train FLOPs", "pre-train wall", "fine-tune FLOPs",
          "metric (95% CI)", "seeds", "vs scratch+ (equal compute)", "vs scratch (plain)", "verdict", "control"]


def write_markdown(path: Path, rows: list[ArmResult], s: Settings, command: str, info: dict[str, Any]) -> None:
    lines = ["# Bake-off", "", "Produced by:", "", "```", command, "```", "",
             f"Data: {s.data or 'the embedded dataset'}; tasks: {', '.join(s.tasks)}"
             + (f" ({detector_of(s)})" if "detection" in s.tasks else "")
             + f"; seeds: {s.seeds}; pre-training budget: {s.budget.describe()}; label fractions: "
             + ", ".join(f"{f:g}" for f in s.label_fractions) + ".",
             "", "Metric in % on the val split (detection: COCO bbox AP; segmentation: mIoU), mean and 95% "
             "Student-t interval over seeds. Differences are paired by seed; the verdict (better / tie / worse) "
             "comes from the interval of the difference to scratch+ of the same architecture: scratch trained "
             "for the fine-tuning schedule plus the pre-training budget (equal total compute).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    controls = control_lines(rows, s)
    if controls:
        lines += ["", "Controls of the protocol (judged against plain scratch, same fine-tuning schedule):", "", *controls]
    lines += ["", "Budget arithmetic (from the probes): " + json.dumps(info), "", "![bake-off](bakeoff.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, rows: list[ArmResult], s: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, f) for t in s.tasks for f in s.label_fractions]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (task, fraction) in zip(axes[0], panels):
        for r in (r for r in rows if r.task == task and r.fraction == fraction):
            x = r.total_flops or float("nan")
            ax.errorbar([x], [100 * r.interval.mean], yerr=[[100 * (r.interval.mean - r.interval.low)],
                                                            [100 * (r.interval.high - r.interval.mean)]],
                        fmt="o", capsize=3, label=f"{r.arm} ({r.arch})")
        ax.set_xscale("log")
        ax.set_xlabel("total training FLOPs (pre-training + fine-tuning)")
        ax.set_ylabel(f"{METRIC_NAME[task]} (%)")
        ax.set_title(f"{task}, {fraction:g} of the labels", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, rows: list[ArmResult], s: Settings, command: str, info: dict[str, Any]) -> None:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.__dict__.items() if k != "budget"}
    settings["budget"] = s.budget.__dict__
    path.write_text(json.dumps({"command": command, "settings": settings, "budget_arithmetic": info,
                                "rows": [r.as_dict() for r in rows]}, indent=2, default=str) + "\n")


def log_wandb(out: Path, rows: list[ArmResult], s: Settings, group: str) -> None:
    """One W&B run (offline without an API key) with the table and the plot; every arm's runs carry the
    same group (WANDB_RUN_GROUP, set when they were launched)."""
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="cheaplunch", name=f"bakeoff-{group}", group=group, job_type="bakeoff", dir=str(out),
                     mode=mode, config={"tasks": s.tasks, "seeds": s.seeds, "budget": s.budget.describe()})
    table = wandb.Table(columns=HEADER, data=table_rows(rows))
    run.log({"bakeoff/table": table, "bakeoff/plot": wandb.Image(str(out / "bakeoff.png"))})
    run.finish()
