"""finetune.py as a user meets it: --help lists the tasks, bad input exits non-zero with ONE line naming
the option or file at fault, and one real subprocess run writes results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.paths import REPO_ROOT
from finetune import main


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune.py"), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=timeout)


def test_help_lists_tasks():
    proc = _cli("--help")
    assert proc.returncode == 0
    for task in ("detection", "segmentation", "classification"):
        assert task in proc.stdout
    assert "--eval-only" in proc.stdout and "--label-fraction" in proc.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--task", "bogus"], "unknown task 'bogus'; choices: classification, detection, segmentation"),
    ([], "--task is required"),
    (["--task", "segmentation", "--detector", "retinanet"], "--detector applies to --task detection only"),
    (["--task", "detection", "--detector", "yolo"], "--detector must be one of retinanet, faster_rcnn, mask_rcnn"),
    (["--task", "detection", "--backbone", "/no/such/backbone.pt"], "/no/such/backbone.pt"),
    (["--task", "detection", "--data", "/no/such/dataset"], "dataset path not found: /no/such/dataset"),
    (["--task", "detection", "model.no_such_key=1"], "model.no_such_key"),
    (["--task", "segmentation", "--label-fraction", "0.1", "--label-count", "3"], "not both"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--eval-only", "--checkpoint", "/no/such.ckpt"], "/no/such.ckpt"),
    (["--eval-only", "--checkpoint", "/no/such.ckpt", "--detector", "retinanet"], "--detector: training options"),
])
def test_errors_are_one_line(args, fragment, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err
    assert len(err.splitlines()) == 1


def test_subprocess_run_writes_results(tiny_embedded, tmp_path):
    out = tmp_path / "cls"
    proc = _cli("--task", "classification", "--data", str(tiny_embedded), "--backbone", "scratch", "--arch",
                "resnet18", "--out", str(out), "--logger", "csv", "--seed", "3", "trainer.max_steps=1",
                "trainer.val_check_interval=1", "trainer.log_every_n_steps=1", "data.image_size=32", "data.batch_size=8", "data.val_batch_size=16",
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"top1", "top5"}
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "val/top1" in metrics and "train/loss" in metrics
