"""Bag of Tricks switches, each checked against an independent computation: PCA lighting, the train/eval
transforms, the IDX reader, distillation, label smoothing, mixup, Xavier / zero-gamma init, ResNet-A/B/C/D,
weight-decay groups, and the lr at every step under warm-up + cosine with the global batch."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cheaplunch.config import load_config
from cheaplunch.registry import METHODS
from common.errors import UserError
from datamodules.classification_pretrain import (
    TrainTransform,
    color_jitter,
    eval_resize_crop,
    random_resized_crop_params,
    read_idx,
    resized_crops,
)
from datamodules.lighting import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from lightning_modules.base import global_batch_size, peak_lr
from lightning_modules.supervised import SupervisedModule
from models.distillation import distillation_loss
from models.montage_losses import soft_cross_entropy
from models.tricks import last_block_norms, set_zero_gamma, stride_on_first_1x1, xavier_init

TINY = ["model.arch=resnet26", "model.backbone_kwargs={layers: [1, 1, 1, 1]}", "model.num_classes=5",
        "data.batch_size=8", "data.image_size=32"]


def cfg_of(*overrides: str):
    return load_config(METHODS["supervised"].config_path, None, [*TINY, *overrides])


def module_of(*overrides: str) -> SupervisedModule:
    m = SupervisedModule(cfg_of(*overrides))
    m.configure_model()
    return m


# ------------------------------------------------------------------------------------------ PCA lighting
def test_train_transform_adds_pca_lighting_with_the_paper_std():
    """Every pixel of an image gets the same offset eigvec @ (alpha * eigval), alpha ~ N(0, 0.1) per image: the
    offsets of 2000 mid-grey images (no clamping), solved for alpha with numpy, have the paper's spread."""
    settings = dict(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0.0, color_jitter=0.0)
    grey = torch.full((2000, 3, 4, 4), 128, dtype=torch.uint8)
    lit = TrainTransform(4, lighting_std=0.1, generator=torch.Generator().manual_seed(0), **settings)(grey)
    plain = TrainTransform(4, lighting_std=0.0, **settings)(grey)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    offset = ((lit - plain) * std * 255).double().numpy()  # back to the 0-255 scale
    assert np.allclose(offset, offset[:, :, :1, :1], atol=1e-3)  # one offset per image and channel
    eigval, eigvec = np.array(IMAGENET_EIGVAL), np.array(IMAGENET_EIGVEC)
    alpha = np.linalg.solve(eigvec * eigval, offset[:, :, 0, 0].T).T  # offset = eigvec @ diag(eigval) @ alpha
    assert abs(alpha.mean()) < 0.01 and np.allclose(alpha.std(axis=0), 0.1, atol=0.006)


# ------------------------------------------------------------------------------------------ transforms
def test_random_resized_crop_params_follow_the_paper_ranges():
    g = torch.Generator().manual_seed(0)
    cw, ch, left, top = random_resized_crop_params(5000, 40, 60, (0.08, 1.0), (3 / 4, 4 / 3), g)
    area = cw * ch / (40 * 60)
    assert area.min() >= 0.07 and area.max() <= 1.0
    # aspect in [3/4, 4/3] up to the rounding of the sides to whole pixels
    assert ((cw + 0.5) / (ch - 0.5) >= 3 / 4).all() and ((cw - 0.5) / (ch + 0.5) <= 4 / 3).all()
    assert (left >= 0).all() and (top >= 0).all() and (left + cw <= 60).all() and (top + ch <= 40).all()
    # the same distribution as torchvision's RandomResizedCrop (which draws one image at a time)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 40, 60), [0.08, 1.0], [3 / 4, 4 / 3])[2:]
                        for _ in range(5000)], dtype=torch.float32)  # (h, w)
    assert abs(area.mean() - (ref[:, 0] * ref[:, 1]).mean() / 2400) < 0.02
    assert abs((cw / ch).mean() - (ref[:, 1] / ref[:, 0]).mean()) < 0.02


def test_resized_crop_of_the_whole_image_is_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 8, 8)
    full = torch.full((2,), 8.0)
    zero = torch.zeros(2)
    same = resized_crops(x, full, full, zero, zero, 8)
    assert torch.allclose(same, x, atol=1e-5)
    flipped = resized_crops(x, full, full, zero, zero, 8, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5) and torch.allclose(flipped[1], x[1], atol=1e-5)
    # a 4x4 window at (left 2, top 4), resampled to 4x4, is exactly those pixels
    four = torch.full((2,), 4.0)
    crop = resized_crops(x, four, four, torch.full((2,), 2.0), torch.full((2,), 4.0), 4)
    assert torch.allclose(crop, x[:, :, 4:8, 2:6], atol=1e-5)


def test_color_jitter_identity_brightness_saturation_hue():
    x = torch.rand(3, 3, 5, 5) * 200
    one, zero = torch.ones(3), torch.zeros(3)
    assert torch.allclose(color_jitter(x, one, one, zero), x, atol=1e-3)
    assert torch.allclose(color_jitter(x, torch.full((3,), 1.2), one, zero), (x * 1.2).clamp(0, 255), atol=1e-3)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    assert torch.allclose(color_jitter(x, one, zero, zero), grey, atol=1e-3)  # saturation 0 = grey
    # a hue rotation keeps the luma (Y of YIQ) and a full turn is the identity
    rotated = color_jitter(x, one, one, torch.full((3,), 0.3))
    luma = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731
    inside = (rotated > 0.5).all(1) & (rotated < 254.5).all(1)  # where no channel was clamped
    assert torch.allclose(luma(rotated)[inside], luma(x)[inside], atol=1e-2)
    assert torch.allclose(color_jitter(x, one, one, torch.full((3,), 2.0)), x, atol=1e-2)


def test_train_transform_output_and_eval_resize_crop():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = TrainTransform(32, generator=g)(grey)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    plain = TrainTransform(28, crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0.0, color_jitter=0.0, lighting_std=0.0)
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(plain(x), (x.float() / 255 - mean) / std, atol=1e-4)  # no augmentation = normalise only
    big = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
    ev = eval_resize_crop(big, 28)  # short side 40 -> 32 (28 * 256/224), then the centre 28 x 28
    ref = F.interpolate(big.float(), size=(32, 48), mode="bilinear", antialias=True, align_corners=False)
    assert ev.shape == (2, 3, 28, 28)
    assert torch.equal(ev, ref[:, :, 2:30, 10:38].round().clamp(0, 255).to(torch.uint8))


# ------------------------------------------------------------------------------------------ IDX reader
def test_read_idx_roundtrip(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2, 3, 4) + data.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), data)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), data)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(Exception, match="data bytes"):
        read_idx(tmp_path / "bad")


# ------------------------------------------------------------------------------------------ losses
def test_distillation_loss_against_hand_computation():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    r = torch.tensor([[10.0, 20.0, -5.0], [3.0, 3.0, 30.0]])
    y = torch.tensor([0, 2])
    T, w = 20.0, 0.5

    def softmax(v):
        e = [math.exp(a - max(v)) for a in v]
        return [a / sum(e) for a in e]

    hard = soft = 0.0
    for zi, ri, yi in zip(z.tolist(), r.tolist(), y.tolist()):
        hard += -math.log(softmax(zi)[yi])
        p, q = softmax([a / T for a in ri]), softmax([a / T for a in zi])
        soft += -sum(pk * math.log(qk) for pk, qk in zip(p, q))
    hard, soft = hard / 2, soft / 2
    total, h, s = distillation_loss(z, r, y, temperature=T, hard_weight=w)
    assert h.item() == pytest.approx(hard, rel=1e-5)
    assert s.item() == pytest.approx(T * T * soft, rel=1e-5)
    assert total.item() == pytest.approx(w * hard + (1 - w) * T * T * soft, rel=1e-5)
    z.requires_grad_(True)
    r.requires_grad_(True)
    distillation_loss(z, r, y)[0].backward()
    assert r.grad is None and z.grad is not None  # the teacher gets no gradient


def test_label_smoothing_equals_torch_cross_entropy():
    m = module_of("model.mixup_alpha=0", "model.label_smoothing=0.1")
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ref = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y)
    assert torch.allclose(m.classification_loss(logits, y), ref)
    smoothed = F.one_hot(y, 5).float() * 0.9 + 0.1 / 5  # the same as an explicit smoothed target
    assert torch.allclose(soft_cross_entropy(logits, smoothed), ref, atol=1e-6)


def test_mixup_mixes_pairs_and_targets_sum_to_one():
    m = module_of("model.mixup_alpha=0.2", "model.label_smoothing=0.1")
    np.random.seed(0)
    x = torch.randn(8, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mixed, target = m.targets(x.clone(), y)
    assert target.shape == (8, 5)
    assert torch.allclose(target.sum(1), torch.ones(8))
    lam = float(((mixed[0] - x[7]) / (x[0] - x[7])).flatten().median())  # x_i' = lam x_i + (1 - lam) x_(B-1-i)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    on, off = 1 - 0.1 + 0.1 / 5, 0.1 / 5
    expect = lam * (F.one_hot(y, 5) * (on - off) + off) + (1 - lam) * (F.one_hot(y.flip(0), 5) * (on - off) + off)
    assert torch.allclose(target, expect, atol=1e-5)
    with pytest.raises(UserError, match="even"):
        SupervisedModule(cfg_of("model.mixup_alpha=0.2", "data.batch_size=7"))


# ------------------------------------------------------------------------------------------ init and model tweaks
def test_xavier_init_and_zero_gamma():
    m = module_of("model.init=xavier", "model.zero_gamma=true")
    conv = m.backbone.layer1[0].conv2
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(conv.weight)
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert m.head.weight.abs().max() <= math.sqrt(6 / (m.head.in_features + 5)) and not m.head.bias.any()
    last = {id(bn) for bn in last_block_norms(m.backbone)}
    assert len(last) == 4  # one per block of resnet26 with layers (1, 1, 1, 1): each bn3
    assert {id(blk.bn3) for blk in m.backbone.modules() if isinstance(blk, timm.models.resnet.Bottleneck)} == last
    for bn in (x for x in m.backbone.modules() if isinstance(x, nn.BatchNorm2d)):
        assert torch.all(bn.weight == (0.0 if id(bn) in last else 1.0)) and not bn.bias.any()
    off = module_of("model.init=timm", "model.zero_gamma=false")  # timm zero-inits bn3 itself: switched back
    assert all(torch.all(bn.weight == 1) for bn in last_block_norms(off.backbone))
    basic = timm.create_model("resnet18", num_classes=0)
    xavier_init(basic)
    assert set_zero_gamma(basic, True) == 8 and all(not blk.bn2.weight.any() for blk in basic.layer1)


# The BN layers of resnet26 (two bottlenecks per stage: a downsampling block, then an identity block), by hand.
# Zero-gamma zeroes exactly the last BN of each residual branch (bn3 of a bottleneck); every other BN
# (stem, bn1, bn2, the downsampling shortcut's BN) keeps gamma 1.
ZERO_GAMMA_BN = {"layer1.0.bn3", "layer1.1.bn3", "layer2.0.bn3", "layer2.1.bn3",
                 "layer3.0.bn3", "layer3.1.bn3", "layer4.0.bn3", "layer4.1.bn3"}
BRANCH_BN = {"layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2", "layer2.0.bn1", "layer2.0.bn2",
             "layer2.1.bn1", "layer2.1.bn2", "layer3.0.bn1", "layer3.0.bn2", "layer3.1.bn1", "layer3.1.bn2",
             "layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"}
# shortcut of the downsampling blocks: A/B/C Sequential(conv 1x1, BN); D Sequential(avg-pool, conv 1x1, BN)
SHORTCUT_BN = {"abc": {"layer1.0.downsample.1", "layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"},
               "d": {"layer1.0.downsample.2", "layer2.0.downsample.2", "layer3.0.downsample.2", "layer4.0.downsample.2"}}
# stem: A/B one 7x7 conv + bn1; C/D (deep stem) Sequential(conv, BN, ReLU, conv, BN, ReLU, conv) + bn1
STEM_BN = {"7x7": {"bn1"}, "deep": {"conv1.1", "conv1.4", "bn1"}}


@pytest.mark.parametrize("row, stem, shortcut", [("t4_3_zero_gamma", "7x7", "abc"), ("t5_b_resnet50b", "7x7", "abc"),
                                                 ("t5_c_resnet50c", "deep", "abc"), ("t5_d_resnet50d", "deep", "d")])
def test_zero_gamma_zeroes_only_the_last_bn_of_each_branch_in_resnet_a_b_c_d(row, stem, shortcut):
    """ResNet-A/B/C/D as the ablation rows build them (resnet26 in place of resnet50: the same blocks,
    fewer of them), Xavier init then zero-gamma: the BN layers at 0 and at 1 are exactly the sets above."""
    rows = Path(__file__).resolve().parents[1] / "configs" / "tricks"
    cfg = load_config(METHODS["supervised"].config_path, rows / f"{row}.yaml", ["model.arch=resnet26", "model.num_classes=5"])
    assert cfg.model.zero_gamma and cfg.model.init == "xavier"
    m = SupervisedModule(cfg)
    bns = {n: bn for n, bn in m.backbone.named_modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)}
    ones = BRANCH_BN | SHORTCUT_BN[shortcut] | STEM_BN[stem]
    assert set(bns) == ZERO_GAMMA_BN | ones
    assert {n for n, bn in bns.items() if torch.all(bn.weight == 0)} == ZERO_GAMMA_BN
    assert {n for n, bn in bns.items() if torch.all(bn.weight == 1)} == ones
    assert all(not bn.bias.any() for bn in bns.values())
    # the architecture is the row's: A has the stride on the first 1x1, D an avg-pool before the shortcut conv
    assert m.backbone.layer2[0].conv1.stride == ((2, 2) if row == "t4_3_zero_gamma" else (1, 1))
    assert isinstance(m.backbone.layer2[0].downsample[0], nn.AvgPool2d) == (shortcut == "d")


def test_zero_gamma_at_28px_leaves_only_the_corner_behind_strided_shortcuts():
    """Why zero-gamma collapses ResNet-A/B/C in the 28 px CPU ablation (benchmarks/results/tricks_ablation_large.md):
    with every residual branch closed, the network is its shortcut chain. A strided 1x1 shortcut keeps the
    top-left pixel of each 2x2 cell, and a 28 px input ends as a 1x1 map, so at initialisation the output
    depends only on the image's top-left corner (Fashion-MNIST background). D's avg-pool shortcut keeps all."""
    from benchmarks.tricks_ablation import input_support

    def support(*overrides):
        return input_support(module_of("model.init=xavier", *overrides).backbone, 28)

    a = ("model.stride_on_1x1=true",)
    d = ("model.backbone_kwargs={layers: [1, 1, 1, 1], stem_type: deep, stem_width: 32, avg_down: true}",)
    assert support(*a, "model.zero_gamma=false") == 1.0
    assert support(*a, "model.zero_gamma=true") == pytest.approx(36 / 28**2, abs=1e-4)  # rows and columns 0..5
    assert support("model.zero_gamma=true") == pytest.approx(36 / 28**2, abs=1e-4)  # B
    assert support(*d, "model.zero_gamma=true") == 1.0


def test_resnet_b_c_d_and_the_original_stride_on_1x1():
    def stem_channels(model):
        return [c.out_channels for c in model.conv1.modules() if isinstance(c, nn.Conv2d)]

    # resnet26 (bottlenecks, 2 per stage) with the kwargs of timm's resnet50 / resnet50c / resnet50d
    b = timm.create_model("resnet26", num_classes=0)
    c = timm.create_model("resnet26", num_classes=0, stem_type="deep", stem_width=32)
    d = timm.create_model("resnet26", num_classes=0, stem_type="deep", stem_width=32, avg_down=True)
    # B: stride 2 on the 3x3 conv of a downsampling block, the first 1x1 keeps stride 1
    assert b.layer2[0].conv1.stride == (1, 1) and b.layer2[0].conv2.stride == (2, 2)
    # C: the 7x7 stem is three 3x3 convs 32, 32, 64 (timm's resnet50c)
    assert stem_channels(c) == [32, 32, 64] and all(m.kernel_size == (3, 3) for m in c.conv1.modules() if isinstance(m, nn.Conv2d))
    assert stem_channels(b) == [64] and b.conv1.kernel_size == (7, 7)
    # D: the downsampling shortcut is a 2x2 avg-pool with stride 2, then a 1x1 conv with stride 1
    for layer in (d.layer2, d.layer3, d.layer4):
        pool, conv, bn = layer[0].downsample
        assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and isinstance(bn, nn.BatchNorm2d)
    assert b.layer2[0].downsample[0].stride == (2, 2)  # B/C: a strided 1x1 conv
    ref = timm.create_model("resnet26d", num_classes=0).state_dict()  # the same network as timm's resnet26d
    assert {k: v.shape for k, v in d.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    # the original ResNet: stride on the first 1x1
    a = timm.create_model("resnet26", num_classes=0)
    assert stride_on_first_1x1(a) == 3
    assert a.layer2[0].conv1.stride == (2, 2) and a.layer2[0].conv2.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert a.forward_features(x).shape == b.forward_features(x).shape == (1, 2048, 2, 2)
    with pytest.raises(UserError):
        stride_on_first_1x1(timm.create_model("resnet18", num_classes=0))


# ------------------------------------------------------------------------------------------ optimizer and lr
def test_no_bias_decay_groups():
    def groups(flag):
        m = module_of(f"optim.no_decay_bias_norm={flag}")
        opt = m.configure_optimizers()
        names = {id(p): n for n, p in m.named_parameters()}
        return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}, m, opt

    g, m, opt = groups("true")
    decay, no_decay = g[1e-4], g[0.0]
    weights = {n for n, p in m.named_parameters() if n.endswith("weight") and p.ndim > 1}
    assert decay == weights  # conv and FC weights only
    assert no_decay == {n for n, _ in m.named_parameters()} - weights  # biases, BN gamma and beta
    assert "head.bias" in no_decay and "backbone.bn1.weight" in no_decay and "head.weight" in decay
    assert type(opt).__name__ == "SGD" and all(gr["nesterov"] and gr["momentum"] == 0.9 for gr in opt.param_groups)
    g, m, _ = groups("false")
    assert set(g) == {1e-4} and g[1e-4] == {n for n, _ in m.named_parameters()}


def test_linear_scaling_uses_the_global_batch():
    cfg = cfg_of("optim.lr=0.1", "optim.lr_scaling=linear", "data.batch_size=32", "trainer.accumulate_grad_batches=2")
    assert global_batch_size(cfg, world_size=8) == 512
    assert peak_lr(cfg, 8) == pytest.approx(0.2)  # 0.1 x 32 x 8 processes x 2 accumulation / 256
    cfg.trainer.num_nodes = 2  # world size already counts nodes: 2 nodes x 4 devices
    assert peak_lr(cfg, 2 * 4) == pytest.approx(0.2)
    cfg.optim.lr_scaling = "none"
    assert peak_lr(cfg, 8) == 0.1


def test_lr_at_every_step_with_warmup_epochs_and_cosine(tmp_path):
    import lightning as L

    from cheaplunch.runner import standard_callbacks

    class Data(L.LightningDataModule):
        num_classes = 5

        def train_dataloader(self):
            from datamodules.classification_pretrain import SupervisedBatch

            g = torch.Generator().manual_seed(0)
            batches = [SupervisedBatch(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g),
                                       torch.arange(4)) for _ in range(4)]
            return torch.utils.data.DataLoader(batches, batch_size=None)  # 4 micro-batches per epoch

    class Record(L.Callback):
        def __init__(self):
            self.lrs = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    cfg = cfg_of("data.batch_size=4", "trainer.accumulate_grad_batches=2", "optim.lr=0.1", "optim.lr_scaling=linear",
                 "schedule.name=cosine", "schedule.warmup_epochs=1", "trainer.max_steps=-1", "trainer.max_epochs=3",
                 "model.mixup_alpha=0")
    rec = Record()
    callbacks = [c for c in standard_callbacks(cfg, tmp_path, export=False) if type(c).__name__ == "WarmupCosineLR"]
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, accumulate_grad_batches=2, logger=False, callbacks=[*callbacks, rec],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(SupervisedModule(cfg), datamodule=Data())
    peak = 0.1 * 4 * 2 / 256  # global batch 8
    total, warm = 6, 2  # 3 epochs x 2 optimizer steps; warm-up 1 epoch = 2 steps
    expect = [peak * s / warm if s < warm else 0.5 * peak * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
              for s in range(total)]
    assert rec.lrs == pytest.approx(expect)
