"""Detectors on a timm backbone: an FPN over its multi-scale features, then torchvision's RetinaNet,
Faster R-CNN or Mask R-CNN. Free of Lightning.

Why not `timm.create_model(features_only=True)` directly: a features-only timm model renames some
modules (e.g. ConvNeXt's ``stages.0`` becomes ``stages_0``) and drops the layers after the last feature,
so an exported backbone (timm key layout) would not load strictly into it. Instead the backbone stays
the plain timm model that ``models.backbones.create_backbone`` builds (weights loaded strictly first) and
:class:`TimmFeaturePyramid` takes its features with ``forward_intermediates`` (the mechanism timm's own
``features_only`` "getter" wrapper uses), indexed like ``backbone.feature_info``. That is the same
composition as torchvision's ``BackboneWithFPN`` (body + ``FeaturePyramidNetwork`` + ``out_channels``),
whose ``IntermediateLayerGetter`` only handles models whose stages are direct children.

Normalisation of the backbone (``norm``): ``frozen_bn`` (default for detection, as in Detectron/
torchvision: BN statistics and affine fixed, torchvision ``FrozenBatchNorm2d``), ``bn`` (trained),
``syncbn`` (``nn.SyncBatchNorm``, statistics over all GPUs) or ``gn`` (GroupNorm, the from-scratch
recipe of He et al., "Rethinking ImageNet Pre-training", 2019). Only BatchNorm layers are converted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from timm.layers import BatchNormAct2d, freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from common.errors import UserError
from common.images import IMAGENET_MEAN, IMAGENET_STD
from models import DETECTORS

HEAD_NORMS = ("none", "gn")  # norm layers of the FPN and heads (see build_detector)
NORMS = ("frozen_bn", "bn", "syncbn", "gn")
# Feature strides each detector builds its FPN on (torchvision / Detectron conventions):
# two-stage detectors use C2..C5 (+ max-pooled P6), RetinaNet C3..C5 (+ P6, P7 by strided convs).
FPN_STRIDES = {"retinanet": (8, 16, 32), "faster_rcnn": (4, 8, 16, 32), "mask_rcnn": (4, 8, 16, 32)}


# ------------------------------------------------------------------------------- normalisation
def _group_norm_copy(bn: nn.BatchNorm2d, groups: int, name: str) -> nn.Module:
    """GroupNorm with the BN's affine parameters (its statistics have no GroupNorm counterpart). A channel
    count that `groups` does not divide is a UserError naming the layer `name` (no silent other group count)."""
    channels = bn.num_features
    if channels % groups:
        fits = max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)
        raise UserError(f"model.norm=gn: layer {name} has {channels} channels, not divisible by model.gn_groups="
                        f"{groups}; set a gn_groups that divides every BatchNorm layer's channel count (the largest "
                        f"that divides this layer's is {fits})")
    gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=True)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(OrderedDict(norm=gn, drop=bn.drop, act=bn.act))
    return gn


def convert_norm(module: nn.Module, norm: str, gn_groups: int = 32) -> nn.Module:
    """Replace the BatchNorm layers of `module` in place (children) according to `norm`; returns it.

    Only BatchNorm layers change: other norm layers (a ConvNeXt's LayerNorms, GroupNorm) are left as they
    are, whatever `norm` says. With ``gn``, `gn_groups` must divide every BatchNorm layer's channel count.
    Call it after loading the pre-trained weights: frozen BN keeps the loaded statistics."""
    if norm not in NORMS:
        raise UserError(f"model.norm must be one of {', '.join(NORMS)}, got '{norm}'")
    if norm == "bn":
        return module
    if norm == "syncbn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if norm == "gn" and gn_groups < 1:
        raise UserError(f"model.gn_groups must be >= 1, got {gn_groups}")

    if norm == "frozen_bn":  # statistics and affine as buffers; timm's BN + activation keeps its activation
        return freeze_batch_norm_2d(module)

    def swap(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                setattr(parent, name, _group_norm_copy(child, gn_groups, prefix + name))
            else:
                swap(child, f"{prefix}{name}.")

    swap(module, "")
    return module


def freeze_stages(backbone: nn.Module, frozen_stages: int) -> None:
    """Stop gradients to the first `frozen_stages` feature levels of a timm model (its stem counts as part
    of the first level): every parameter registered before the module of ``feature_info[frozen_stages]``.
    Detectron's FREEZE_AT=2 (stem + res2 of a ResNet) is ``frozen_stages=2``."""
    if frozen_stages <= 0:
        return
    info = list(backbone.feature_info)
    if frozen_stages >= len(info):
        backbone.requires_grad_(False)
        return
    stop = info[frozen_stages]["module"] + "."
    for name, param in backbone.named_parameters():
        if name.startswith(stop):
            break
        param.requires_grad_(False)


# ------------------------------------------------------------------------------ backbone + FPN
def feature_indices(backbone: nn.Module, strides: Sequence[int]) -> list[int]:
    """Indices into `backbone.feature_info` of the features with the given strides (in order)."""
    info = list(getattr(backbone, "feature_info", []) or [])
    by_stride = {int(f["reduction"]): i for i, f in enumerate(info)}
    missing = [s for s in strides if s not in by_stride]
    if missing:
        have = sorted(by_stride)
        raise UserError(f"backbone has no features at stride(s) {missing} (has {have}); detection needs an "
                        "architecture with stride-4..32 features (e.g. resnet*, convnext*, efficientnet*) "
                        "and no dilation (model.backbone_kwargs.output_stride must be 32)")
    return [by_stride[s] for s in strides]


class TimmFeaturePyramid(nn.Module):
    """`body` (a timm model) -> its features at `indices` -> FPN. Has `out_channels` as torchvision's
    detectors require; returns an OrderedDict '0', '1', ... (+ 'pool' or 'p6', 'p7')."""

    def __init__(self, body: nn.Module, indices: Sequence[int], out_channels: int = 256,
                 extra: str = "pool", norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        if not hasattr(body, "forward_intermediates"):
            raise UserError(f"timm model {type(body).__name__} has no forward_intermediates(); "
                            "pick another architecture for detection")
        self.body = body
        self.indices = list(indices)
        in_channels = [int(body.feature_info[i]["num_chs"]) for i in self.indices]
        extra_block = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block, norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


# -------------------------------------------------------------------------------------- builders
def anchor_generator(sizes: Sequence[float], three_scales: bool) -> AnchorGenerator:
    """One anchor size per FPN level (x2^(0, 1/3, 2/3) octave scales for RetinaNet), ratios 0.5, 1, 2."""
    if three_scales:
        per_level = tuple(tuple(float(s) * 2 ** (k / 3) for k in range(3)) for s in sizes)
    else:
        per_level = tuple((float(s),) for s in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))


def build_detector(
    kind: str,
    backbone: nn.Module,
    num_classes: int,
    *,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
    fpn_channels: int = 256,
    detections_per_img: int = 100,
    score_thresh: float = 0.05,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    head_norm: str = "none",
    gn_groups: int = 32,
) -> nn.Module:
    """torchvision RetinaNet / Faster R-CNN / Mask R-CNN over an FPN on the timm `backbone`.

    `num_classes` counts object classes only. RetinaNet (sigmoid classifier) predicts labels
    0..num_classes-1; the R-CNNs reserve label 0 for background, so their labels are shifted by one
    (see `label_offset`).

    `head_norm="gn"`: GroupNorm in the FPN and every head, the recipe for training detectors from scratch
    (He et al., "Rethinking ImageNet Pre-training", ICCV 2019: GN in the FPN and heads, the R-CNN box head
    as 4 convs + 1 fc); the heads are torchvision's own with a norm layer, as in its "v2" detectors."""
    if kind not in DETECTORS:
        raise UserError(f"--detector must be one of {', '.join(DETECTORS)}, got '{kind}'")
    if head_norm not in HEAD_NORMS:
        raise UserError(f"model.head_norm must be one of {', '.join(HEAD_NORMS)}, got '{head_norm}'")
    if head_norm == "gn" and fpn_channels % gn_groups:
        raise UserError(f"model.head_norm=gn: model.fpn_channels={fpn_channels} is not divisible by "
                        f"model.gn_groups={gn_groups}")
    norm = (lambda channels: nn.GroupNorm(gn_groups, channels)) if head_norm == "gn" else None
    extra = "p6p7" if kind == "retinanet" else "pool"
    neck = TimmFeaturePyramid(backbone, feature_indices(backbone, FPN_STRIDES[kind]), fpn_channels, extra, norm)
    levels = len(FPN_STRIDES[kind]) + (2 if extra == "p6p7" else 1)
    if len(anchor_sizes) != levels:
        raise UserError(f"model.anchor_sizes needs {levels} sizes for {kind} (one per FPN level), got {list(anchor_sizes)}")
    sizes = tuple(int(s) for s in min_size) if isinstance(min_size, Sequence) else (int(min_size),)
    common = dict(min_size=sizes, max_size=int(max_size), image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    if kind == "retinanet":
        anchors = anchor_generator(anchor_sizes, True)
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        return RetinaNet(neck, num_classes, anchor_generator=anchors, head=head,
                         detections_per_img=detections_per_img, score_thresh=score_thresh, **common)
    names = [str(i) for i in range(len(FPN_STRIDES[kind]))]
    rcnn = dict(
        rpn_anchor_generator=anchor_generator(anchor_sizes, False),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
        box_detections_per_img=detections_per_img, box_score_thresh=score_thresh,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_batch_size_per_image=box_batch_size_per_image,
    )
    if norm is not None:  # He et al. 2019: "4conv1fc" box head with GN
        rcnn["box_head"] = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm_layer=norm)
    if kind == "mask_rcnn" and norm is not None:
        rcnn["mask_head"] = MaskRCNNHeads(fpn_channels, [256] * 4, 1, norm_layer=norm)
    if kind == "faster_rcnn":
        return FasterRCNN(neck, num_classes + 1, **rcnn, **common)
    return MaskRCNN(neck, num_classes + 1, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), **rcnn, **common)


def label_offset(kind: str) -> int:
    """What to add to a dataset label (0..C-1) to get the detector's class index."""
    return 0 if kind == "retinanet" else 1
