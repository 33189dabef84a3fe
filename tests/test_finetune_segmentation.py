"""Semantic segmentation fine-tuning end to end on the tiny embedded dataset (DeepLabV3, mIoU), the
nested label-fraction subsets, overlays, and --eval-only reproducing the run's metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cheaplunch.config import load_config
from cheaplunch.finetune import run_finetune
from cheaplunch.registry import TASKS
from datamodules.segmentation import SegmentationDataModule
from lightning_modules.segmentation import segmentation_loss

TINY = ["model.arch=resnet18", "data.batch_size=2", "data.val_batch_size=4", "data.num_workers=0",
        "data.crop_size=64", "data.base_size=64", "data.val_size=64", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "logging.num_images=2", "schedule.warmup_steps=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_segmentation_trains_evaluates_and_eval_only_reproduces(tiny_embedded, tmp_path):
    out = tmp_path / "seg"
    res = run_finetune("segmentation", backbone="scratch", data=str(tiny_embedded), out=out, logger="none",
                       resume="never", label_fraction=0.5, overrides=TINY)
    written = json.loads((out / "results.json").read_text())
    assert written == res.results
    assert set(written) == {"mIoU", "per_class_IoU"}
    names = list(OmegaConf.load(out / "config.yaml").data.class_names)
    assert list(written["per_class_IoU"]) == list(names) and names[0] == "background"
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in written["per_class_IoU"].values())
    assert 0.0 <= written["mIoU"] <= 1.0
    assert len(list((out / "images" / "val_segmentation").glob("*.png"))) == 2

    run_finetune(None, eval_only=True, checkpoint=str(out / "checkpoints" / "final.ckpt"),
                 out=tmp_path / "eval", logger="none")
    reproduced = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert reproduced["mIoU"] == pytest.approx(written["mIoU"], abs=1e-9)
    assert reproduced["per_class_IoU"] == pytest.approx(written["per_class_IoU"], abs=1e-9)


def _subset(root, *extra) -> set[int]:
    cfg = load_config(TASKS["segmentation"].config_path, None, [f"data.root={root}", *extra])
    dm = SegmentationDataModule(cfg)
    dm.setup("fit")
    return {int(i) for i in dm.train_set.indices}


def test_label_fraction_subsets_nested_and_deterministic(tiny_embedded):
    full = _subset(tiny_embedded)
    f25, f50 = _subset(tiny_embedded, "data.label_fraction=0.25"), _subset(tiny_embedded, "data.label_fraction=0.5")
    assert len(full) == 12 and len(f25) == 3 and len(f50) == 6
    assert f25 <= f50 <= full
    assert f25 == _subset(tiny_embedded, "data.label_fraction=0.25")
    assert _subset(tiny_embedded, "data.label_count=2") <= f25
    assert len(_subset(tiny_embedded, "data.label_fraction=0.25", "data.subset_seed=1")) == 3


def test_loss_ignores_255_and_is_finite_when_all_ignored():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 255], [2, 255]]])
    by_hand = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[labels[0] != 255],
                                                labels[0][labels[0] != 255])
    assert torch.allclose(segmentation_loss(logits, labels), by_hand)
    assert float(segmentation_loss(logits, torch.full((1, 2, 2), 255))) == 0.0


def test_training_crops_keep_labels_aligned(tiny_embedded):
    cfg = load_config(TASKS["segmentation"].config_path, None, [f"data.root={tiny_embedded}", "data.crop_size=64"])
    dm = SegmentationDataModule(cfg)
    dm.setup("fit")
    image, label, _ = dm.train_set[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and label.shape == (64, 64)
    values = set(np.unique(label.numpy()).tolist())
    assert values <= set(range(dm.num_classes)) | {255}
