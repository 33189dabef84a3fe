"""Issue #14, "bad input and faults": each case driven through the real command line (``train.py`` /
``finetune.py`` in a subprocess) ends in exit status 2 and exactly ONE ``error:`` line that names the file
at fault, with no traceback; a dataset the method can use (montage / FCMAE without a val split) is
accepted. The wrong-number cases (degenerate val boxes scored, 16-bit images read white) are tested where
the number is made: tests/test_finetune_metrics.py and tests/test_readers.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cheaplunch import REPO_ROOT

# Small, quick settings: nothing here should train more than a step.
MONTAGE = ["--method", "montage", "--logger", "none", "model.arch=resnet18", "data.canvas=64", "data.batch_size=4",
           "data.num_workers=0", "data.max_side=64", "trainer.accelerator=cpu", "data.epoch_size=8"]
FCMAE = ["--method", "fcmae", "--logger", "none", "data.num_workers=0", "data.batch_size=4", "data.image_size=64",
         "trainer.accelerator=cpu"]
FINETUNE = ["--logger", "none", "trainer.max_steps=1", "trainer.accelerator=cpu", "data.num_workers=0"]


def _cli(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=timeout)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _exported_backbone(folder: Path) -> Path:
    from models.backbones import create_backbone
    from models.export import export_backbone

    return export_backbone(create_backbone("resnet18"), "resnet18", folder)


# ---- the cases: each builds its bad input under tmp_path and returns (script, args, what the line must say)
Case = Callable[[Path, Path], tuple[str, list[str], list[str]]]


def half_written_last_ckpt(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """A crash cut last.ckpt short; step0000002.ckpt beside it is whole: offer it, not only a restart."""
    ckpts = tmp / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(64)}}, ckpts / "step0000002.ckpt")
    whole = (ckpts / "step0000002.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    return "train.py", ["--data", data, "--out", tmp / "run", *MONTAGE, "trainer.max_steps=4"], [
        f"{ckpts / 'last.ckpt'}: cannot read the checkpoint to resume from", f"--resume {ckpts / 'step0000002.ckpt'}"]


def broken_backbone_json(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """backbone.pt is fine; its backbone.json is cut short: the JSON is at fault."""
    pt = _exported_backbone(tmp / "export")
    pt.with_suffix(".json").write_text('{"arch": "resnet18",')
    return "finetune.py", ["--task", "classification", "--data", data, "--backbone", tmp / "export",
                           "--out", tmp / "ft", *FINETUNE], [f"{pt.with_suffix('.json')}: cannot read"]


def garbage_backbone_pt(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """A backbone.pt that is not a torch file (a failed download): unreadable, not torch's weights_only advice."""
    pt = _exported_backbone(tmp / "export")
    pt.write_bytes(np.random.default_rng(17).bytes(4096))
    return "finetune.py", ["--task", "classification", "--data", data, "--backbone", pt, "--out", tmp / "ft",
                           *FINETUNE], [f"{pt}: exported backbone unreadable: not a torch weights file"]


def pickled_object_weights(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """Weights pickled with a Python object: refused for safety, in one line."""
    path = tmp / "weights.pt"
    torch.save({"w": torch.zeros(2), "module": torch.nn.Linear(1, 1)}, path)
    return "finetune.py", ["--task", "classification", "--data", data, "--backbone", path, "--arch", "resnet18",
                           "--out", tmp / "ft", *FINETUNE], [f"{path}: backbone weights refused for safety"]


def truncated_instances_json_segmentation(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """Segmentation takes its class names from instances_*.json: a truncated one is named, not 'add classes.txt'."""
    root = _copy(data, tmp / "data")
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text()[:300])
    return "finetune.py", ["--task", "segmentation", "--data", root, "--backbone", "scratch", "--arch", "resnet18",
                           "--out", tmp / "ft", *FINETUNE], [f"{ann}: not valid JSON"]


CASES: dict[str, Case] = {
    "half_written_last_ckpt": half_written_last_ckpt,
    "broken_backbone_json": broken_backbone_json,
    "garbage_backbone_pt": garbage_backbone_pt,
    "pickled_object_weights": pickled_object_weights,
    "truncated_instances_json_segmentation": truncated_instances_json_segmentation,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_naming_the_file(name, tiny_embedded, tmp_path):
    script, args, fragments = CASES[name](tiny_embedded, tmp_path)
    proc = _cli(script, *args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "likely succeed" not in proc.stderr  # torch's advice to load with weights_only=False


# ---- accepted: pre-training reads only the train split
def _train_only(data: Path, tmp: Path) -> Path:
    root = tmp / "train_only"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    shutil.copytree(data / "images" / "train", root / "images" / "train")
    shutil.copy(data / "annotations" / "instances_train.json", root / "annotations")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method_args", [MONTAGE, FCMAE], ids=["montage", "fcmae"])
def test_pretraining_accepts_a_dataset_without_val(method_args, tiny_embedded, tmp_path):
    """Montage and FCMAE never read the val split; a dataset with only train is theirs to use (was refused)."""
    root = _train_only(tiny_embedded, tmp_path)
    proc = _cli("train.py", "--data", root, "--out", tmp_path / "run", *method_args, "trainer.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "backbone.pt").is_file()
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["global_step"] == 1
