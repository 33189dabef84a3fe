"""`--backbone` loading: exported backbone and Lightning checkpoint round trips (weights equal), strict
mismatch errors that list the keys, weights_only refusal, and the norm conversions of the detectors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from cheaplunch.config import load_config
from cheaplunch.registry import TASKS
from common.errors import UserError
from common.paths import CONFIG_DIR
from lightning_modules.base import PretrainModule
from models.backbone_loading import load_backbone_weights, resolve_backbone
from models.backbones import create_backbone
from models.detectors import convert_norm, freeze_stages
from models.export import export_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_backbone(arch: str = "resnet18", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_backbone(arch)
    with torch.no_grad():  # non-default BN statistics, so that a silent non-load would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exported_backbone_round_trip(tmp_path):
    source = _random_backbone()
    pt = export_backbone(source, "resnet18", tmp_path / "run", method="test")
    for spec in (pt, tmp_path / "run"):  # the file or its folder
        resolved = resolve_backbone(str(spec))
        assert resolved.arch == "resnet18" and not resolved.is_scratch
        target = create_backbone(resolved.arch)
        load_backbone_weights(target, resolved.state, resolved.description)
        _assert_same(target.state_dict(), source.state_dict())


def test_backbone_loaded_into_finetune_module(tmp_path):
    """The task module starts from exactly the exported weights (before its own layers wrap them)."""
    source = _random_backbone()
    pt = export_backbone(source, "resnet18", tmp_path)
    resolved = resolve_backbone(str(pt))
    cfg = load_config(TASKS["classification"].config_path, None, ["model.num_classes=3"])
    module = TASKS["classification"].module_class()(cfg, backbone_state=resolved.state, backbone_source="x")
    _assert_same(module.backbone.state_dict(), source.state_dict())


class _TinyPretrain(PretrainModule):
    """A stand-in pre-training method: any loss on the backbone output."""

    def compute_losses(self, batch):
        return {"loss": self.backbone(batch).pow(2).mean()}


def test_lightning_checkpoint_of_a_pretraining_run(tmp_path):
    from cheaplunch.runner import standard_callbacks

    cfg = load_config(TASKS["classification"].config_path, None, ["checkpoint.every_n_steps=1", "data.batch_size=2"])
    module = _TinyPretrain(cfg)
    trainer = L.Trainer(max_steps=1, logger=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=standard_callbacks(cfg, tmp_path, export=False))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.rand(2, 3, 32, 32), batch_size=2))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    for spec in (ckpt, tmp_path):  # the checkpoint, or a run folder without backbone.pt
        resolved = resolve_backbone(str(spec))
        assert resolved.arch == "resnet18"
        target = create_backbone("resnet18")
        load_backbone_weights(target, resolved.state, resolved.description)
        _assert_same(target.state_dict(), module.backbone.state_dict())


def test_detection_checkpoint_hands_its_trained_backbone_on(tmp_path):
    """A detection run's checkpoint (the bake-off's detection positive control) gives the detector's backbone,
    trained BatchNorm statistics included, to the next fine-tuning."""
    cfg = load_config(TASKS["detection"].config_path, CONFIG_DIR / "bakeoff" / "detection.yaml",
                      ["model.arch=resnet18", "model.num_classes=3"])
    detector = TASKS["detection"].module_class()(cfg)
    with torch.no_grad():  # as if trained: weights and BN statistics away from a fresh init
        for module in detector.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.weight.uniform_(0.5, 1.5)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": detector.state_dict(), "hyper_parameters": {"config": OmegaConf.to_container(cfg)}},
               tmp_path / "checkpoints" / "last.ckpt")
    resolved = resolve_backbone(str(tmp_path))  # the run folder, as the bake-off passes it
    assert resolved.arch == "resnet18"
    segmenter = TASKS["segmentation"].module_class()(
        load_config(TASKS["segmentation"].config_path, None, ["model.num_classes=3"]),
        backbone_state=resolved.state, backbone_source=resolved.description)
    # the weights the detector itself runs (its FPN's body), not the module's alias the loader reads
    body = {k.removeprefix("detector.backbone.body."): v for k, v in detector.state_dict().items()
            if k.startswith("detector.backbone.body.")}
    _assert_same(segmenter.backbone.state_dict(), body)


def test_wrong_arch_lists_missing_keys(tmp_path):
    pt = export_backbone(_random_backbone(), "resnet18", tmp_path)
    resolved = resolve_backbone(str(pt), arch="resnet34")  # --arch overrides the recorded arch
    assert resolved.arch == "resnet34"
    with pytest.raises(UserError) as err:
        load_backbone_weights(create_backbone("resnet34"), resolved.state, resolved.description)
    msg = str(err.value)
    assert "missing" in msg and "layer1.2.conv1.weight" in msg and str(pt) in msg
    assert "\n" not in msg
    # a smaller architecture: the extra keys are listed as unexpected / mis-shaped
    with pytest.raises(UserError, match="unexpected|shape mismatch"):
        load_backbone_weights(create_backbone("resnet10t"), resolved.state, resolved.description)


def test_missing_and_unsafe_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve_backbone(str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="needs --arch"):
        resolve_backbone("scratch")
    assert resolve_backbone("scratch", default_arch="resnet18").is_scratch
    evil = tmp_path / "evil.ckpt"  # a pickled object that is not a tensor / plain container
    torch.save({"state_dict": {}, "hyper_parameters": {"config": OmegaConf.create({"a": 1})}}, evil)
    with pytest.raises(UserError, match="weights_only"):
        resolve_backbone(str(evil))
    plain = tmp_path / "plain.pt"
    torch.save(_random_backbone().state_dict(), plain)
    with pytest.raises(UserError, match="--arch"):
        resolve_backbone(str(plain))
    assert resolve_backbone(str(plain), arch="resnet18").arch == "resnet18"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="neither backbone.pt"):
        resolve_backbone(str(empty))


def test_frozen_bn_keeps_the_function_and_freezes():
    model = _random_backbone().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    convert_norm(model, "frozen_bn")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.train()  # frozen BN has no train mode: same output
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
    assert all(not n.startswith("bn1") for n, _ in model.named_parameters())  # BN affine became buffers
    freeze_stages(model, 2)  # stem + layer1 (Detectron FREEZE_AT=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and "layer1.0.conv1.weight" in frozen
    assert all(not n.startswith(("layer2", "layer3", "layer4")) for n in frozen)
    gn = convert_norm(_random_backbone(), "gn")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    with pytest.raises(UserError, match="model.norm"):
        convert_norm(_random_backbone(), "weird")
