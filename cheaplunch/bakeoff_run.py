"""One run of a bake-off's plan (cheaplunch/bakeoff.py): its command line and folder, whether it is done, the
record of the command that made the folder, and what a finished run may give back of its disk."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.paths import REPO_ROOT

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # a dotted key=value config override
PROBE_STEPS = 8  # FLOPs per step counted on steps 1..3 (ComputeMeter skips step 0), seconds per step timed on 4..7


@dataclass
class Run:
    """One run of the plan: a command line, its folder, the architecture it trains."""

    key: str
    kind: str  # probe | pretrain | finetune
    script: str  # train.py | finetune.py
    args: list[str]
    out: Path
    arch: str
    steps: int = PROBE_STEPS  # optimizer steps it trains
    probe: str = ""  # key of the probe that measured its cost per step
    needs: str = ""  # key of the run whose output it reads (a fine-tuning's pre-training), if any
    val_every: int = 0  # steps between its validations (0: none)

    def done(self) -> bool:
        """Its outputs are there and it trained every step (a run stopped early by a signal writes them too)."""
        marker = "results.json" if self.script == "finetune.py" and self.kind != "probe" else "compute.json"
        if not ((self.out / marker).is_file() and (self.out / "compute.json").is_file()):
            return False
        return int(self.compute().get("optimizer_steps") or 0) >= self.steps

    def prune(self) -> None:
        """Free the disk a finished run holds (a fine-tuning checkpoint with its optimizer and EMA state is about
        190 MB, written every 200 steps): a probe's or fine-tuning's checkpoints go (the bake-off reads only their
        results); a pre-training keeps last.ckpt, which a detection control's fine-tunings read."""
        folder = self.out / "checkpoints"
        if not folder.is_dir():
            return
        if self.kind != "pretrain":
            shutil.rmtree(folder)
            return
        for path in folder.glob("*.ckpt"):
            if path.name != "last.ckpt":
                path.unlink()

    @property
    def record(self) -> Path:
        """The script and arguments that made this folder (written before the run starts)."""
        return self.out / "bakeoff_run.json"

    def claim(self) -> None:
        """Record this run's script and arguments in its folder; a folder made with other ones (the command or
        its settings changed since) is a UserError, not a result to reuse or a checkpoint to resume."""
        args = self.args  # less the logger, which changes no result
        made_by = [self.script, *(a for i, a in enumerate(args) if "--logger" not in (a, args[i - 1] if i else ""))]
        recorded = read_json(self.record)
        if recorded is not None and recorded != made_by:
            changed = sorted(set(map(str, recorded)) ^ set(made_by))
            raise UserError(f"{self.out} was made by another command ({self.record}; differing arguments: "
                            f"{' '.join(changed) or 'their order'}); give another --out or delete that folder")
        if recorded is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps(made_by, indent=1) + "\n")

    def command(self) -> list[str]:
        """The command line: options first, then the key=value overrides in their order (argparse takes the
        positional overrides only as one block; a later one wins, so an arm's own settings come last)."""
        overrides = [a for a in self.args if OVERRIDE.match(a)]
        options = [a for a in self.args if not OVERRIDE.match(a)]
        return [sys.executable, str(REPO_ROOT / self.script), *options, "--out", str(self.out), "--resume", "auto",
                *overrides]

    def compute(self) -> dict[str, Any]:
        return read_json(self.out / "compute.json") or {}

    @property
    def log(self) -> Path:
        """The run's output (stdout and stderr, or the SLURM job's)."""
        return self.out / "bakeoff.log"

    def log_tail(self, lines: int = 4) -> str:
        """The last lines of the log, joined with " | " (for a one-line error)."""
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return " | ".join(text.strip().splitlines()[-lines:])


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
