"""Classification: linear probe (backbone weights untouched) and full fine-tuning (backbone changes),
top-1 / top-5 in results.json, eval-only reproduction, an ImageFolder dataset, and the batched
augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cheaplunch.finetune import run_finetune
from datamodules.classification import random_resized_flip, square_crop
from models.export import export_backbone

TINY = ["model.arch=resnet18", "data.batch_size=8", "data.val_batch_size=16", "data.image_size=32",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "logging.num_images=2", "schedule.warmup_steps=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _backbone_of(ckpt_path) -> dict[str, torch.Tensor]:
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("backbone.")}


def test_linear_probe_keeps_backbone_and_eval_only_reproduces(tiny_embedded, tmp_path):
    from models.backbones import create_backbone

    torch.manual_seed(3)
    source = create_backbone("resnet18")
    pt = export_backbone(source, "resnet18", tmp_path / "pre")
    out = tmp_path / "probe"
    res = run_finetune("classification", backbone=str(pt), data=str(tiny_embedded), out=out, logger="none",
                       resume="never", overrides=TINY + ["model.freeze_backbone=true"])
    written = json.loads((out / "results.json").read_text())
    assert set(written) == {"top1", "top5"} and written == res.results
    assert 0.0 <= written["top1"] <= written["top5"] <= 1.0
    after = _backbone_of(out / "checkpoints" / "final.ckpt")
    for k, v in source.state_dict().items():  # frozen: weights and BN statistics unchanged
        assert torch.equal(after["backbone." + k], v), k
    again = run_finetune(None, eval_only=True, checkpoint=str(out / "checkpoints" / "final.ckpt"), logger="none")
    assert again.results == pytest.approx(written, abs=1e-9)


def test_full_finetuning_changes_backbone(tiny_embedded, tmp_path):
    from models.backbones import create_backbone

    torch.manual_seed(4)
    source = create_backbone("resnet18")
    pt = export_backbone(source, "resnet18", tmp_path / "pre")
    out = tmp_path / "full"
    run_finetune("classification", backbone=str(pt), data=str(tiny_embedded), out=out, logger="none",
                 resume="never", overrides=TINY + ["model.freeze_backbone=false", "optim.lr=0.05"])
    final = _backbone_of(out / "checkpoints" / "final.ckpt")
    changed = [k for k, v in source.state_dict().items()
               if k.endswith("weight") and not torch.equal(final["backbone." + k], v)]
    assert len(changed) > 10


def test_image_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (40, 50, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    res = run_finetune("classification", backbone="scratch", data=str(tmp_path / "folder"), out=tmp_path / "run",
                       logger="none", resume="never", overrides=TINY + ["data.batch_size=4"])
    assert set(res.results) == {"top1", "top5"}
    assert res.results["top5"] == 1.0  # two classes: top-5 covers both


def test_batched_augmentation_and_crops():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) / 400
    same = random_resized_flip(images, scale=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(same, images, atol=1e-5)
    flipped = random_resized_flip(images, scale=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)
    out = random_resized_flip((images * 255).byte(), scale=(0.3, 0.6))
    assert out.shape == images.shape and out.dtype == torch.float32 and 0 <= float(out.min()) <= float(out.max()) <= 1
    img = np.zeros((20, 30, 3), np.uint8)
    img[5:10, 10:20] = 255
    crop = square_crop(img, cx=15, cy=7.5, side=10, size=10)
    assert crop.shape == (10, 10, 3)
    # window rows 2..11, cols 10..19: the object (rows 5..9) fills crop rows 3..7, nothing above
    assert crop[3:8, :].min() == 255 and crop[:2].max() == 0


def test_rerun_resumes_and_keeps_history(tiny_embedded, tmp_path):
    out = tmp_path / "resume"
    common = dict(backbone="scratch", data=str(tiny_embedded), out=out, logger="none")
    over = TINY + ["trainer.val_check_interval=1", "checkpoint.every_n_steps=1"]
    run_finetune("classification", **common, overrides=over)
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [1, 2]
    run_finetune("classification", **common, overrides=over + ["trainer.max_steps=3"])  # resume='auto'
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3]


@pytest.mark.slow
def test_ddp_top1_equals_single_process(tiny_embedded, tmp_path):
    """Two gloo processes: counts summed over ranks without duplicated val samples (top-1/top-5 equal a
    single-process evaluation of the same checkpoint)."""
    import os
    import subprocess
    import sys

    from common.paths import REPO_ROOT

    out = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "finetune.py"), "--task", "classification", "--data", str(tiny_embedded),
           "--backbone", "scratch", "--arch", "resnet18", "--out", str(out), "--logger", "none", "--devices", "2",
           "trainer.accelerator=cpu", "trainer.strategy=ddp", "data.val_batch_size=5", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "results.json").read_text())
    single = run_finetune(None, eval_only=True, checkpoint=str(out / "checkpoints" / "final.ckpt"), logger="none",
                          devices=1, overrides=["trainer.strategy=auto"])
    assert single.results == pytest.approx(ddp, abs=1e-9)
