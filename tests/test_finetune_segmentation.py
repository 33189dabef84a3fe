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


def test_deeplab_head_is_torchvisions_with_default_shape():
    """models.segmenters.deeplab_head with rates 12/24/36 and 256 channels is torchvision's DeepLabHead:
    same keys and shapes, and the same output once it holds DeepLabHead's weights."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    from models.segmenters import deeplab_head

    torch.manual_seed(0)
    reference, mine = DeepLabHead(64, 5).eval(), deeplab_head(64, 5).eval()
    ref_state = reference.state_dict()
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    mine.load_state_dict(ref_state)
    x = torch.randn(2, 64, 9, 11)
    torch.testing.assert_close(mine(x), reference(x), rtol=0, atol=0)
    assert deeplab_head(64, 5, atrous_rates=(2, 4, 6), channels=32)[1].weight.shape == (32, 32, 3, 3)


def _contrastive_module(root, *extra):
    from cheaplunch.registry import METHODS
    from lightning_modules.contrastive import ContrastiveModule

    cfg = load_config(METHODS["contrastive"].config_path, None, [
        f"data.root={root}", "model.arch=resnet18", "model.decoder_channels=32", "model.proj_dim=16",
        "model.atrous_rates=[2,4,6]", *extra])
    torch.manual_seed(1)
    module = ContrastiveModule(cfg)
    for p in module.embed.decoder.parameters():  # not the default init: a copy is recognisable
        torch.nn.init.normal_(p)
    return module


def _segmenter(root, source):
    from cheaplunch.finetune import _pretrained_decoder
    from lightning_modules.segmentation import SegmentationModule

    cfg = load_config(TASKS["segmentation"].config_path, None, [f"data.root={root}", "model.num_classes=4"])
    kwargs, note = _pretrained_decoder(SegmentationModule, cfg, source)
    return SegmentationModule(cfg, backbone_state=source.state, **kwargs), cfg, note


def test_contrastive_decoder_seeds_the_segmentation_head(tiny_embedded, tmp_path):
    """Both forms of a contrastive run (exported folder, Lightning checkpoint) hand their ASPP + 3x3 conv/BN
    to the DeepLabV3 head, whose width and rates follow it; only the classifier starts fresh."""
    import lightning as L

    from models.backbone_loading import resolve_backbone

    module = _contrastive_module(tiny_embedded)
    expected = {k: v.clone() for k, v in module.embed.decoder.state_dict().items()}
    module.export_backbone(tmp_path / "run")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    for spec in (tmp_path / "run", tmp_path / "last.ckpt"):
        source = resolve_backbone(str(spec))
        assert source.decoder_channels == 32 and source.decoder_rates == [2, 4, 6]
        seg, cfg, note = _segmenter(tiny_embedded, source)
        assert cfg.model.decoder_channels == 32 and list(cfg.model.atrous_rates) == [2, 4, 6]
        assert "model.decoder_channels=32" in note and "ASPP" in note
        head = seg.model.classifier.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(head[key], value, rtol=0, atol=0)
        assert head["4.weight"].shape == (4, 32, 1, 1)
        assert seg.model.classifier[0].convs[1][0].dilation == (2, 2)


def test_decoder_mismatch_and_opt_out(tiny_embedded, tmp_path):
    """A head of another width is a clear error listing the keys; opting out, or a task without a DeepLab
    head, leaves the decoder unused with a note."""
    from cheaplunch.finetune import _pretrained_decoder
    from common.errors import UserError
    from lightning_modules.classification import ClassificationModule
    from lightning_modules.segmentation import SegmentationModule
    from models.backbone_loading import resolve_backbone

    _contrastive_module(tiny_embedded).export_backbone(tmp_path / "run")
    source = resolve_backbone(str(tmp_path / "run"))
    cfg = load_config(TASKS["segmentation"].config_path, None, [f"data.root={tiny_embedded}", "model.num_classes=4"])
    with pytest.raises(UserError, match=r"decoder of .*shape mismatch \(\d+\): 0\.convs"):
        SegmentationModule(cfg, backbone_state=source.state, decoder_state=source.decoder,
                           decoder_source=f"decoder of {source.description}")  # 256-wide head, 32-wide decoder
    cfg = load_config(TASKS["segmentation"].config_path, None, ["model.pretrained_decoder=false", "model.num_classes=4"])
    assert _pretrained_decoder(SegmentationModule, cfg, source) == ({}, "model.pretrained_decoder=false: the "
                                                                      "DeepLab head starts from random weights")
    kwargs, note = _pretrained_decoder(ClassificationModule, cfg, source)
    assert kwargs == {} and "not used" in note
