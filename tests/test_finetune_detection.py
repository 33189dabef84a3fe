"""Detection fine-tuning end to end on the tiny embedded dataset: every detector trains a few steps,
evaluates with COCO AP (bbox, + segm for Mask R-CNN), writes results.json / history.json / prediction
images; --eval-only on the saved checkpoint reproduces the run's metrics."""

from __future__ import annotations

import json

import pytest
import torch

from cheaplunch.finetune import run_finetune

KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
# Tiny images and a small RPN budget keep a step well under a second on one core.
TINY = [
    "model.arch=resnet18", "model.train_sizes=[96,128]", "model.test_size=128", "model.max_size=128",
    "model.fpn_channels=32", "model.rpn_pre_nms_top_n_train=200", "model.rpn_post_nms_top_n_train=100",
    "model.rpn_pre_nms_top_n_test=100", "model.rpn_post_nms_top_n_test=50", "model.box_batch_size_per_image=64",
    "model.detections_per_img=20", "data.batch_size=2", "data.val_batch_size=4", "data.num_workers=0",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "logging.num_images=2", "logging.score_threshold=0.0",
    "schedule.warmup_steps=1",
]


@pytest.fixture(autouse=True)
def one_thread_offline(monkeypatch, one_torch_thread):
    monkeypatch.setenv("WANDB_MODE", "offline")


def _check_coco(results: dict, kinds: tuple[str, ...]) -> None:
    assert set(results) == set(kinds)
    for kind in kinds:
        assert set(results[kind]) == KEYS
        # fractions in [0, 1]; -1 only where pycocotools finds no ground truth in an area range
        assert all(0.0 <= v <= 1.0 or v == -1.0 for v in results[kind].values())
        assert 0.0 <= results[kind]["AP"] <= 1.0


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn", "mask_rcnn"])
def test_detector_trains_and_evaluates(detector, tiny_embedded, tmp_path):
    out = tmp_path / detector
    res = run_finetune("detection", detector=detector, backbone="scratch", data=str(tiny_embedded), out=out,
                       logger="none", resume="never", overrides=TINY)
    kinds = ("bbox", "segm") if detector == "mask_rcnn" else ("bbox",)
    written = json.loads((out / "results.json").read_text())
    assert written == res.results
    _check_coco(written, kinds)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [2]  # evaluated once, at the last step
    assert (out / "checkpoints" / "final.ckpt").is_file()
    assert len(list((out / "images" / "val_predictions").glob("*.png"))) == 2
    # the losses are torchvision's terms, all finite after two steps
    ckpt = torch.load(out / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["config"]["model"]["detector"] == detector
    # scratch: trainable BN (model.norm_scratch) instead of frozen random-init statistics
    assert ckpt["hyper_parameters"]["config"]["model"]["norm"] == "bn"

    if detector == "mask_rcnn":  # eval-only reproduces the run's metrics (bbox and segm)
        again = run_finetune(None, eval_only=True, checkpoint=str(out / "checkpoints" / "final.ckpt"),
                             logger="none", overrides=["data.num_workers=0"])
        assert again.run_dir == (out / "eval").resolve()
        reproduced = json.loads((out / "eval" / "results.json").read_text())
        for kind in kinds:
            assert reproduced[kind] == pytest.approx(written[kind], abs=1e-9)


def test_label_fraction_and_flip_in_detection_data(tiny_embedded):
    from cheaplunch.config import load_config
    from cheaplunch.registry import TASKS
    from datamodules.detection import DetectionDataModule

    def indices(*extra):
        cfg = load_config(TASKS["detection"].config_path, None, [f"data.root={tiny_embedded}", *extra])
        dm = DetectionDataModule(cfg)
        dm.setup("fit")
        return dm

    full = indices()
    half = indices("data.label_fraction=0.5")
    quarter = indices("data.label_fraction=0.25")
    assert set(quarter.train_set.indices) <= set(half.train_set.indices) <= set(full.train_set.indices)
    assert len(quarter.train_set) < len(half.train_set) < len(full.train_set) + 1
    # the horizontal flip mirrors boxes with the image
    ds = full.train_set
    ds.flip_p = 1.0
    flipped, target, _, _ = ds[0]
    ds.flip_p = 0.0
    plain, target0, _, _ = ds[0]
    assert torch.equal(flipped, plain.flip(-1))
    w = plain.shape[-1]
    assert torch.allclose(target["boxes"][:, 0], w - target0["boxes"][:, 2])


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(tiny_embedded, tmp_path):
    """Two gloo processes: each val image is evaluated on one rank, detections are gathered, and the
    COCO AP equals a single-process evaluation of the same checkpoint."""
    import os
    import subprocess
    import sys

    from common.paths import REPO_ROOT

    out = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "finetune.py"), "--task", "detection", "--detector", "faster_rcnn",
           "--data", str(tiny_embedded), "--backbone", "scratch", "--out", str(out), "--logger", "none",
           "--devices", "2", "trainer.accelerator=cpu", "trainer.strategy=ddp", "data.val_batch_size=1", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "results.json").read_text())
    single = run_finetune(None, eval_only=True, checkpoint=str(out / "checkpoints" / "final.ckpt"), logger="none",
                          devices=1, overrides=["data.num_workers=0", "trainer.strategy=auto"])
    assert single.results["bbox"] == pytest.approx(ddp["bbox"], abs=1e-9)


@pytest.mark.parametrize("kind", ["retinanet", "faster_rcnn", "mask_rcnn"])
def test_head_norm_gn_puts_group_norm_in_fpn_and_heads(kind):
    from torch import nn

    from models.backbones import create_backbone
    from models.detectors import build_detector

    torch.manual_seed(0)
    sizes = [16, 32, 64, 128, 256]
    det = build_detector(kind, create_backbone("resnet18"), 3, min_size=64, max_size=64, anchor_sizes=sizes,
                         fpn_channels=64, head_norm="gn", gn_groups=16)
    fpn_norms = [m for m in det.backbone.fpn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(fpn_norms) == 2 * (3 if kind == "retinanet" else 4)  # inner (1x1) + layer (3x3) blocks
    heads = det.head if kind == "retinanet" else det.roi_heads
    head_norms = [m for m in heads.modules() if isinstance(m, nn.GroupNorm)]
    expected = {"retinanet": 8, "faster_rcnn": 4, "mask_rcnn": 8}[kind]  # 4 per conv tower
    assert len(head_norms) == expected and all(m.num_groups == 16 for m in head_norms)
    det.train()
    images = [torch.rand(3, 64, 64)]
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    if kind == "mask_rcnn":
        mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
        mask[0, 8:48, 8:40] = 1
        target["masks"] = mask
    losses = det(images, [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    plain = build_detector(kind, create_backbone("resnet18"), 3, min_size=64, max_size=64, anchor_sizes=sizes,
                           fpn_channels=64)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
