"""The comparison harness: two inits, same seed and schedule, markdown table + plot written; a finished
run is reused, not re-run."""

from __future__ import annotations

import json

import torch

from benchmarks.compare_pretraining import main
from models.backbones import create_backbone
from models.export import export_backbone


def test_compare_two_inits(tiny_embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    pt = export_backbone(create_backbone("resnet18"), "resnet18", tmp_path / "pre")
    argv = ["--task", "classification", "--init", f"pre={pt}", "--init", "scratch=scratch", "--data", str(tiny_embedded),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--logger", "none",
            "trainer.max_steps=2", "trainer.val_check_interval=1", "data.image_size=32", "data.batch_size=8",
            "logging.num_images=0"]
    assert main(argv) == 0
    md = (tmp_path / "results" / "compare_classification.md").read_text()
    assert "| pre |" in md and "| scratch |" in md and "resnet18" in md
    assert (tmp_path / "results" / "compare_classification.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "results" / "compare_classification.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["pre", "scratch"]
    assert [h["step"] for h in summary["runs"][0]["histories"][0]] == [1, 2]
    stamp = (tmp_path / "runs" / "classification" / "pre" / "seed0" / "results.json").stat().st_mtime_ns
    assert main(argv) == 0  # reuses the finished runs
    assert (tmp_path / "runs" / "classification" / "pre" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert main(["--init", "oops", "--task", "classification"]) == 2
