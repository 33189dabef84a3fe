"""Layer-wise lr decay (``optim.layer_decay``) acts on every fine-tuning task.

The expected lr of a parameter is computed by hand from the architecture: timm orders a ResNet as
stem, then one layer per residual block; a ConvNeXt as stem, then one layer per block (a stage's
downsample joins its first block); everything outside the backbone (FPN, heads, new classifier) is the
top layer. lr = peak_lr x decay ** (layers above the parameter's layer).
"""

from __future__ import annotations

import pytest
import torch

from cheaplunch.checks import check_config
from cheaplunch.config import load_config
from cheaplunch.finetune import run_finetune
from cheaplunch.registry import TASKS
from common.errors import UserError

DECAY = 0.5  # far from 1, so one layer of difference is a factor 2
PEAK = 0.01

# resnet18: stem = layer 0, blocks layer1.0 .. layer4.1 = layers 1..8, head = layer 9 (the top).
RESNET18_DEPTH_FROM_TOP = {
    "backbone.conv1.weight": 9,            # stem
    "backbone.layer2.1.conv1.weight": 5,   # middle stage: block 4
    "backbone.layer4.1.bn2.weight": 1,     # last block
    "head.weight": 0,                      # new classifier
}
# convnextv2_atto, depths (2, 2, 6, 2): stem = 0; stage 0 blocks = 1, 2; stage 1 = 3, 4 (its downsample
# with block 0 = 3); stage 2 = 5..10; stage 3 = 11, 12; the timm head norm and the classifier = 13.
CONVNEXTV2_ATTO_DEPTH_FROM_TOP = {
    "backbone.stem.0.weight": 13,
    "backbone.stages.2.downsample.1.weight": 8,   # with stages.2.blocks.0 (layer 5)
    "backbone.stages.2.blocks.3.conv_dw.weight": 5,
    "backbone.stages.3.blocks.1.mlp.fc2.weight": 1,
    "backbone.head.norm.weight": 0,
    "head.weight": 0,
}

TINY = ["data.batch_size=8", "data.val_batch_size=16", "data.image_size=32", "trainer.max_steps=1",
        "trainer.val_check_interval=1", "logging.num_images=0", "schedule.name=constant", "schedule.warmup_steps=0",
        "model.freeze_backbone=false", f"optim.lr={PEAK}", "optim.lr_scaling=none", f"optim.layer_decay={DECAY}"]


def _lr_by_name(module: torch.nn.Module, param_groups: list[dict]) -> dict[str, float]:
    """Name -> lr, from param groups whose "params" are indices in the order the optimizer was built."""
    optimizer = module.configure_optimizers()
    order = [p for g in optimizer.param_groups for p in g["params"]]
    name_of = {id(p): n for n, p in module.named_parameters()}
    lrs: dict[str, float] = {}
    for group in param_groups:
        for index in group["params"]:
            lrs[name_of[id(order[index])]] = group["lr"]
    return lrs


@pytest.mark.parametrize("arch, depth_from_top", [("resnet18", RESNET18_DEPTH_FROM_TOP),
                                                  ("convnextv2_atto", CONVNEXTV2_ATTO_DEPTH_FROM_TOP)])
def test_classification_lr_per_parameter_after_a_real_step(tiny_embedded, tmp_path, arch, depth_from_top):
    result = run_finetune("classification", arch=arch, data=str(tiny_embedded), out=tmp_path, logger="none",
                          resume="never", overrides=TINY)
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    from lightning_modules.classification import ClassificationModule

    module = ClassificationModule(ckpt["hyper_parameters"]["config"])
    lrs = _lr_by_name(module, ckpt["optimizer_states"][0]["param_groups"])
    assert len(lrs) == sum(p.requires_grad for p in module.parameters())
    for name, depth in depth_from_top.items():
        assert lrs[name] == pytest.approx(PEAK * DECAY ** depth, rel=1e-9), name
    # every backbone parameter is below the top, except timm's own head norm (unmatched = the top)
    backbone = [n for n in lrs if n.startswith("backbone.") and not n.startswith("backbone.head.")]
    assert max(lrs[n] for n in backbone) == pytest.approx(PEAK * DECAY)


def _module(task: str, overrides: list[str]) -> torch.nn.Module:
    entry = TASKS[task]
    cfg = load_config(entry.config_path, overrides=["model.num_classes=3", *overrides])
    return entry.module_class()(cfg)


@pytest.mark.parametrize("task, head_param", [("detection", "detector.head.classification_head.cls_logits.weight"),
                                              ("detection", "detector.backbone.fpn.inner_blocks.0.0.weight"),
                                              ("segmentation", "model.classifier.4.weight")])
def test_detection_and_segmentation_backbone_decays_head_does_not(task, head_param):
    overrides = ["model.arch=resnet18", f"optim.layer_decay={DECAY}", f"optim.lr={PEAK}", "optim.lr_scaling=none"]
    if task == "detection":
        overrides.append("model.detector=retinanet")
    module = _module(task, overrides)
    optimizer = module.configure_optimizers()
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(module.named_parameters())
    assert head_param in params, sorted(params)[-20:]
    assert scale[id(params[head_param])] == 1.0
    assert scale[id(params["backbone.conv1.weight"])] == pytest.approx(DECAY ** 9)
    assert scale[id(params["backbone.layer3.0.conv2.weight"])] == pytest.approx(DECAY ** 4)


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze_backbone=true", "optim.layer_decay=0.9"], "frozen"),
    (["model.freeze_backbone=false", "optim.layer_decay=1.5"], "(0, 1]"),
    (["model.freeze_backbone=false", "optim.layer_decay=0"], "(0, 1]"),
])
def test_layer_decay_that_cannot_act_is_a_start_up_error(overrides, message):
    cfg = load_config(TASKS["classification"].config_path, overrides=["model.arch=resnet18", *overrides])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
        check_config(cfg, task="classification")


def test_layer_decay_off_is_one_group_scale():
    module = _module("classification", ["model.arch=resnet18", "model.freeze_backbone=false"])
    optimizer = module.configure_optimizers()
    assert {g.get("lr_scale", 1.0) for g in optimizer.param_groups} == {1.0}
