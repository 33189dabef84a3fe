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

from common.paths import REPO_ROOT

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


def _corrupt_train_image(data: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the dataset whose 6th train image is cut to 200 bytes (a failed copy)."""
    root = _copy(data, tmp / "data")
    bad = sorted((root / "images" / "train").iterdir())[5]
    bad.write_bytes(bad.read_bytes()[:200])
    return root, bad


def corrupt_image_detection(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """An unreadable train image: one line at start-up naming it (it was a worker traceback at step 5-6)."""
    root, bad = _corrupt_train_image(data, tmp)
    return "finetune.py", ["--task", "detection", "--detector", "retinanet", "--data", root, "--backbone", "scratch",
                           "--arch", "resnet18", "--out", tmp / "ft", *FINETUNE, "model.train_sizes=[64]",
                           "model.test_size=64", "model.max_size=64"], [
        f"{bad}: cannot read image", "1 of 12 images", "data.bad_images=skip"]


def corrupt_image_segmentation(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    root, bad = _corrupt_train_image(data, tmp)
    return "finetune.py", ["--task", "segmentation", "--data", root, "--backbone", "scratch", "--arch", "resnet18",
                           "--out", tmp / "ft", *FINETUNE], [f"{bad}: cannot read image", "data.bad_images=skip"]


def unwritable_cache_dir(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """--cache-dir on a path that cannot be a folder (a file is in the way; root ignores permissions)."""
    blocker = tmp / "file"
    blocker.write_text("not a folder")
    return "train.py", ["--data", data, "--out", tmp / "run", "--cache-dir", blocker / "cache", *MONTAGE,
                        "trainer.max_steps=1"], [f"{blocker / 'cache'}: cannot write the cache folder", "--cache-dir"]


def unwritable_out(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """--out below a file: one line before any data is read (was a traceback at the first write)."""
    blocker = tmp / "file"
    blocker.write_text("not a folder")
    return "finetune.py", ["--task", "classification", "--data", data, "--backbone", "scratch", "--arch", "resnet18",
                           "--out", blocker / "run", *FINETUNE], [f"{blocker / 'run'}: cannot write the run folder"]


def garbage_eval_checkpoint(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """--eval-only with a file that is not a checkpoint: named, unreadable, no torch advice."""
    path = tmp / "last.ckpt"
    path.write_bytes(np.random.default_rng(5).bytes(2048))
    return "finetune.py", ["--eval-only", "--checkpoint", path, "--data", data, "--logger", "none"], [
        f"{path}: checkpoint unreadable: not a torch weights file"]


def unknown_bad_images_policy(data: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    return "finetune.py", ["--task", "segmentation", "--data", data, "--backbone", "scratch", "--arch", "resnet18",
                           "--out", tmp / "ft", *FINETUNE, "data.bad_images=ignore"], [
        "data.bad_images='ignore': must be one of error, skip"]


CASES: dict[str, Case] = {
    "half_written_last_ckpt": half_written_last_ckpt,
    "broken_backbone_json": broken_backbone_json,
    "garbage_backbone_pt": garbage_backbone_pt,
    "pickled_object_weights": pickled_object_weights,
    "truncated_instances_json_segmentation": truncated_instances_json_segmentation,
    "corrupt_image_detection": corrupt_image_detection,
    "corrupt_image_segmentation": corrupt_image_segmentation,
    "unwritable_cache_dir": unwritable_cache_dir,
    "unwritable_out": unwritable_out,
    "garbage_eval_checkpoint": garbage_eval_checkpoint,
    "unknown_bad_images_policy": unknown_bad_images_policy,
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


@pytest.mark.slow
def test_corrupt_image_skipped_with_one_counted_warning(tiny_embedded, tmp_path):
    root, bad = _corrupt_train_image(tiny_embedded, tmp_path)
    proc = _cli("finetune.py", "--task", "segmentation", "--data", root, "--backbone", "scratch", "--arch", "resnet18",
                "--out", tmp_path / "ft", *FINETUNE, "data.bad_images=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "skipping them (data.bad_images=skip)" in line]
    assert len(warned) == 1 and f"{bad}: cannot read image" in warned[0] and "1 of 24 images" in warned[0], warned


def test_no_file_is_written_into_the_dataset_folder(tiny_embedded, tmp_path):
    """Montage's sample bank and the image checks live in the cache folder (--cache-dir), never in --data."""
    root = _copy(tiny_embedded, tmp_path / "data")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    proc = _cli("train.py", "--data", root, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", *MONTAGE,
                "trainer.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert list((tmp_path / "cache" / "sample_bank").iterdir())


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
