"""The ConvNeXt V2 fine-tuning recipe for classification: the paper YAML resolves to the official values,
every switch acts (head, drop path, Mixup / CutMix, RandAugment, random erasing), and one CPU run with every
switch on trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cheaplunch.config import load_config
from cheaplunch.finetune import run_finetune
from cheaplunch.registry import TASKS
from common.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASK_YAML = TASKS["classification"].config_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paper_yaml_resolves_to_the_official_atto_recipe():
    cfg = load_config(TASK_YAML, CONFIGS / "finetune_classification_convnextv2_paper.yaml")
    # facebookresearch/ConvNeXt-V2 TRAINING.md (Atto) and main_finetune.py defaults, typed in by hand.
    expected = {
        "model.arch": "convnextv2_atto", "model.backbone_kwargs.drop_path_rate": 0.1, "model.label_smoothing": 0.2,
        "model.head_init_std": 2e-5, "model.freeze_backbone": False,
        "data.batch_size": 32, "data.image_size": 224, "data.rand_augment": "rand-m9-mstd0.5-inc1",
        "data.random_erasing": 0.25, "data.mixup_alpha": 0.0, "data.cutmix_alpha": 0.0,
        "trainer.devices": 8, "trainer.accumulate_grad_batches": 4, "trainer.max_steps": 600 * (1281167 // 1024),
        "optim.name": "adamw", "optim.lr": 2e-4, "optim.lr_scaling": "linear", "optim.reference_batch_size": 256,
        "optim.weight_decay": 0.3, "optim.layer_decay": 0.9, "optim.no_decay_bias_norm": True,
        "schedule.name": "cosine", "schedule.warmup_steps": 0, "ema.enabled": True, "ema.decay": 0.9999,
    }
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value) if isinstance(value, float) else node == value, key
    # peak lr 2e-4 x 1024 / 256 = 8e-4, min lr 1e-6
    from lightning_modules.base import peak_lr

    peak = peak_lr(cfg, world_size=8)
    assert peak == pytest.approx(8e-4)
    assert peak * cfg.schedule.min_lr_factor == pytest.approx(1e-6)


def _module(overrides: list[str]):
    from lightning_modules.classification import ClassificationModule

    cfg = load_config(TASK_YAML, overrides=["model.num_classes=5", *overrides])
    return ClassificationModule(cfg)


def test_convnext_head_is_pool_then_layernorm_then_linear():
    torch.manual_seed(0)
    module = _module(["model.arch=convnextv2_atto"]).eval()
    for p in module.backbone.head.norm.parameters():  # not the identity init, so the norm's affine shows
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 64, 64)
    fmap = module.backbone.forward_features(x)  # the stages' output, before any head
    pooled = fmap.mean(dim=(2, 3))
    norm = module.backbone.head.norm
    expected = F.linear(F.layer_norm(pooled, (pooled.shape[1],), norm.weight, norm.bias, eps=norm.eps),
                        module.head.weight, module.head.bias)
    torch.testing.assert_close(module.classify(x), expected, rtol=1e-5, atol=1e-5)


def test_drop_path_is_active_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with_drop = _module(["model.arch=convnextv2_atto", "model.backbone_kwargs.drop_path_rate=0.5"])
    without = _module(["model.arch=convnextv2_atto", "model.backbone_kwargs.drop_path_rate=0.0"])
    with_drop.train()
    without.train()
    assert not torch.equal(with_drop.classify(x), with_drop.classify(x))  # a random depth per call
    torch.testing.assert_close(without.classify(x), without.classify(x))
    with_drop.eval()
    torch.testing.assert_close(with_drop.classify(x), with_drop.classify(x))


def test_mixup_mixes_images_and_targets_with_label_smoothing():
    module = _module(["data.mixup_alpha=0.8", "data.cutmix_alpha=0.0", "model.label_smoothing=0.1"])
    torch.manual_seed(1)
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = module.mixup(x.clone(), labels)
    # timm's batch mixup: x_i' = lam x_i + (1 - lam) x_(B-1-i); recover lam from the images
    flipped = x.flip(0)
    lam = float(((mixed - flipped) * (x - flipped)).sum() / ((x - flipped) ** 2).sum())
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * flipped, rtol=1e-5, atol=1e-5)
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5  # label smoothing over 5 classes
    hard = torch.full((4, 5), off).scatter_(1, labels[:, None], on)
    torch.testing.assert_close(targets, lam * hard + (1 - lam) * hard.flip(0), rtol=1e-5, atol=1e-5)


def test_mixup_needs_an_even_batch():
    with pytest.raises(UserError, match="even batch"):
        _module(["data.cutmix_alpha=1.0", "data.batch_size=7"])


def test_rand_augment_changes_images_and_bad_policy_is_an_error():
    from datamodules.classification import apply_per_image, rand_augment

    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    same = apply_per_image(lambda im: im, images)
    assert (same - images).abs().max() <= 0.5 / 255 + 1e-6  # only the uint8 round trip
    changed = apply_per_image(rand_augment("rand-m9-mstd0.5-inc1", 32), images)
    assert changed.shape == images.shape
    assert (changed - same).abs().mean() > 0.01
    for bad in ("rand-bogus", "rand-q9", "augmix-m5", "rand-m9-n"):
        with pytest.raises(UserError, match="data.rand_augment"):
            rand_augment(bad, 32)


def test_random_erasing_erases_some_images():
    module = _module(["data.random_erasing=1.0"])
    x = torch.zeros(4, 3, 16, 16)
    erased = module.random_erasing(x.clone())
    assert all((erased[i] != 0).any() for i in range(4))  # probability 1: every image gets a noise box


def test_one_cpu_run_with_every_switch_on(tiny_embedded, tmp_path):
    """The CPU recipe (layer decay, drop path, smoothing, RandAugment, erasing, EMA) plus Mixup and CutMix."""
    res = run_finetune("classification", data=str(tiny_embedded), out=tmp_path, logger="none", resume="never",
                       config=str(CONFIGS / "finetune_classification_convnextv2_cpu.yaml"),
                       overrides=["data.image_size=32", "data.batch_size=8", "data.val_batch_size=16",
                                  "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "trainer.max_steps=2",
                                  "trainer.val_check_interval=2", "logging.num_images=0"])
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == res.results and 0.0 <= written["top1"] <= 1.0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["step"] == 2
    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len({g["lr_scale"] for g in groups}) == 14  # atto: stem, 12 blocks, head (layer decay on)
    assert np.isfinite([g["lr"] for g in groups]).all()
    compute = json.loads((tmp_path / "compute.json").read_text())  # the run's measured compute
    assert compute["optimizer_steps"] == 2 and compute["counted_steps"] == 1 and compute["flops_per_step"] > 0
    assert compute["images_seen"] == 2 * 8
