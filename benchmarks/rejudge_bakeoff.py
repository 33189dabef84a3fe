#!/usr/bin/env python
"""Write a finished bake-off's report again from its bakeoff.json, with the verdict rules of this checkout.

Nothing trains: the per-seed values, costs and settings in bakeoff.json are what the bake-off measured. Use it
when a rule of cheaplunch/bakeoff_verdicts.py changed after a bake-off ran. The command line in the new report
says that it was re-judged, and by what.

    python benchmarks/rejudge_bakeoff.py benchmarks/results/bakeoff_controls
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cheaplunch.bakeoff import Budget, Settings  # noqa: E402
from cheaplunch.bakeoff_report import write_json, write_markdown, write_plot  # noqa: E402
from cheaplunch.bakeoff_verdicts import ArmResult, summarise  # noqa: E402

COSTS = ("pretrain_flops", "pretrain_seconds", "finetune_flops")


def rejudge(report: dict) -> tuple[Settings, list[ArmResult]]:
    """The settings of a bakeoff.json and its rows judged again from their per-seed values."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = {k: v for k, v in report["settings"].items() if k in fields}
    s = Settings(**{**settings, "budget": Budget(**settings["budget"]), "out": Path(settings["out"])})
    rows: list[ArmResult] = []
    for task in s.tasks:
        for fraction in s.label_fractions:
            panel = [r for r in report["rows"] if r["task"] == task and r["fraction"] == fraction]
            rows += summarise({r["arm"]: r["values"] for r in panel}, task, fraction,
                              {r["arm"]: r["arch"] for r in panel},
                              {r["arm"]: {k: r[k] for k in COSTS} for r in panel})
    return s, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a bake-off folder with bakeoff.json")
    folder = parser.parse_args().folder
    report = json.loads((folder / "bakeoff.json").read_text())
    s, rows = rejudge(report)
    command = f"{report['command']}\n# re-judged from its bakeoff.json: python benchmarks/rejudge_bakeoff.py {folder}"
    info = report["budget_arithmetic"]
    write_plot(folder / "bakeoff.png", rows, s)
    write_markdown(folder / "bakeoff.md", rows, s, command, info)
    write_json(folder / "bakeoff.json", rows, s, command, info)
    print((folder / "bakeoff.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
