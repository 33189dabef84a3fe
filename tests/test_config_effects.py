"""Every option acts as its config says, or the run stops at start-up with a clear error (issue #11: a silent
no-op is a defect). Start-up checks are run with a --data path that does not exist, so the test also shows
that the error comes before any data is read."""

from __future__ import annotations

import functools
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch._dynamo.utils import counters

from cheaplunch.config import BASE_CONFIG, load_config
from cheaplunch.finetune import _describe_data, run_finetune
from cheaplunch.pretrain import run_pretraining
from cheaplunch.registry import METHODS, TASKS
from common.errors import UserError
from lightning_modules.base import PretrainModule
from models.detectors import convert_norm

NO_DATA = "/nonexistent/cheaplunch-test-data"


def _base_cfg(arch: str, *overrides: str, **backbone_kwargs) -> DictConfig:
    """base.yaml with a model section: enough for a bare PretrainModule."""
    cfg = OmegaConf.merge(OmegaConf.load(BASE_CONFIG), {"model": {"arch": arch, "backbone_kwargs": backbone_kwargs}},
                          OmegaConf.from_dotlist(list(overrides)))
    assert isinstance(cfg, DictConfig)
    return cfg


# ------------------------------------------------------------------------------------------ runtime.compile
@pytest.fixture
def compiled_frames(monkeypatch):
    """torch.compile with dynamo's eager backend (traces like the real one, needs no C++ compiler), and
    dynamo's counters cleared: ``counters["frames"]["ok"]`` then counts the frames compiled since."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    yield counters["frames"]
    torch._dynamo.reset()
    counters.clear()


def test_compile_acts_on_fcmae(compiled_frames, one_torch_thread):
    from lightning_modules.fcmae import FCMAEModule

    cfg = load_config(METHODS["fcmae"].config_path, None, ["runtime.compile=true", "model.decoder_dim=16"])
    module = FCMAEModule(cfg)
    module.configure_model()
    images = torch.randn(2, 3, 64, 64)
    losses = module.compute_losses(SimpleNamespace(images=images, mask=module.fcmae.random_mask(images)))
    assert torch.isfinite(losses["loss"])
    assert compiled_frames["ok"] > 0  # the backbone alone would be compiled but never called: 0 frames


def test_compile_acts_on_detection(compiled_frames, one_torch_thread):
    cfg = load_config(TASKS["detection"].config_path, None, [
        "runtime.compile=true", "model.num_classes=2", "model.train_sizes=[64]", "model.test_size=64",
        "model.max_size=64", "model.fpn_channels=32"])
    module = TASKS["detection"].module_class()(cfg)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        out = module([torch.rand(3, 64, 64)])
    assert set(out[0]) >= {"boxes", "scores", "labels"}
    assert compiled_frames["ok"] > 0  # the FPN reads the backbone through forward_intermediates, not __call__


# ------------------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("name, overrides, expected", [
    ("rmsprop", ["optim.momentum=0.5"], {"momentum": 0.5}),
    ("lion", ["optim.betas=[0.8,0.95]"], {"betas": (0.8, 0.95)}),
    ("adan", ["optim.betas=[0.9,0.9,0.95]"], {"betas": (0.9, 0.9, 0.95)}),
    ("momentum", ["optim.momentum=0.7"], {"momentum": 0.7, "nesterov": False}),
])
def test_momentum_and_betas_reach_every_optimizer_that_takes_them(name, overrides, expected):
    module = PretrainModule(_base_cfg("resnet10t", f"optim.name={name}", *overrides))
    optimizer = module.configure_optimizers()
    assert {k: optimizer.defaults[k] for k in expected} == expected


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=adamx"], "optim.name=adamx: not a timm optimizer; similar: .*adamw"),
    (["optim.name=foo_adamw"], "lookahead_<name>"),
    (["optim.name=adan"], r"optim.betas=\[0.9, 0.999\]: the adan optimizer takes 3 betas"),
])
def test_bad_optimizer_settings_fail_at_start_up(overrides, message):
    with pytest.raises(UserError, match=message):
        run_pretraining("montage", data=NO_DATA, logger="none", overrides=overrides)


def test_lookahead_prefix_is_still_accepted():
    module = PretrainModule(_base_cfg("resnet10t", "optim.name=lookahead_adamw", "optim.betas=[0.8,0.9]"))
    optimizer = module.configure_optimizers()
    assert type(optimizer).__name__ == "Lookahead" and optimizer.defaults["betas"] == (0.8, 0.9)


# ------------------------------------------------------------------------------------------ no_weight_decay
def test_backbone_no_weight_decay_list_reaches_timm():
    module = PretrainModule(_base_cfg("vit_tiny_patch16_224", "optim.weight_decay=0.05", img_size=32))
    optimizer = module.configure_optimizers()
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= no_decay  # 3-D: only the ViT's own list exempts them
    assert "backbone.patch_embed.proj.weight" in decay


def test_fcmae_keeps_its_own_no_weight_decay_and_adds_the_backbones():
    from lightning_modules.fcmae import FCMAEModule

    module = FCMAEModule(load_config(METHODS["fcmae"].config_path, None, ["model.decoder_dim=16"]))
    module.backbone.no_weight_decay = lambda: {"stem.0.weight"}
    assert {"backbone.stem.0.weight", "fcmae.mask_token"} <= module.no_weight_decay()


# ------------------------------------------------------------------------------------------ start-up checks
@pytest.mark.parametrize("run, overrides, message", [
    ("montage", ["runtime.matmul_precision=low"], "runtime.matmul_precision=low: must be one of highest, high, medium"),
    ("classification", ["task=detection"], "task=detection in the config, but this is a 'classification' run"),
    ("detection", ["model.freeze_backbone=true", "model.frozen_stages=2"],
     "model.frozen_stages=2 has no effect with model.freeze_backbone=true"),
    ("classification", ["model.freeze_backbone=true", "model.backbone_kwargs.drop_path_rate=0.1"],
     "drop_path_rate=0.1 has no effect with model.freeze_backbone=true"),
    ("detection", ["model.freeze_backbone=true", "model.backbone_kwargs.drop_path_rate=0.2"],
     "drop_path_rate=0.2 has no effect"),
])
def test_options_that_cannot_act_fail_before_the_data_is_read(tmp_path, run, overrides, message):
    with pytest.raises(UserError, match=message):
        if run in METHODS:
            run_pretraining(run, data=NO_DATA, logger="none", out=tmp_path, overrides=overrides)
        else:
            run_finetune(run, data=NO_DATA, logger="none", out=tmp_path, overrides=overrides)


# ------------------------------------------------------------------------------------------ contrastive
def test_contrastive_has_no_ignore_index_to_set():
    # 255 is the void / padding label of the data (datamodules.segmentation); another value could not act
    with pytest.raises(UserError, match="unknown config key 'model.ignore_index'"):
        load_config(METHODS["contrastive"].config_path, None, ["model.ignore_index=0"])


# ------------------------------------------------------------------------------------------ data.class_names
def test_class_names_set_by_the_user_must_match_the_data(tiny_embedded):
    entry = TASKS["classification"]
    cfg = load_config(entry.config_path, None, [f"data.root={tiny_embedded}"])
    names = list(_describe_data(entry, cfg).class_names)  # null: taken from the data
    assert list(cfg.data.class_names) == names and len(names) > 1
    agreeing = load_config(entry.config_path, None, [f"data.root={tiny_embedded}"])
    agreeing.data.class_names = names
    _describe_data(entry, agreeing)
    swapped = load_config(entry.config_path, None, [f"data.root={tiny_embedded}"])
    swapped.data.class_names = [names[1], names[0], *names[2:]]
    with pytest.raises(UserError, match="data.class_names=.* but the dataset's classes are"):
        _describe_data(entry, swapped)


# ------------------------------------------------------------------------------------------ model.norm=gn
def test_group_norm_needs_groups_that_divide_the_channels():
    def model() -> nn.Module:
        return nn.Sequential(OrderedDict(stem=nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 24, 3),
                                                                        bn=nn.BatchNorm2d(24)))))

    with pytest.raises(UserError, match=r"layer stem.bn has 24 channels, not divisible by model.gn_groups=32.* is 24"):
        convert_norm(model(), "gn", 32)
    with pytest.raises(UserError, match="layer stem.bn has 24 channels.* is 12"):
        convert_norm(model(), "gn", 16)
    norm = convert_norm(model(), "gn", 8).stem.bn
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 8


@pytest.mark.parametrize("run, override, message", [
    ("montage", "trainer.max_steps=-1", "trainer.max_steps=-1: must be an integer >= 1"),
    ("montage", "data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("montage", "optim.lr=abc", "optim.lr='abc': must be a number > 0"),
    ("montage", "data.batch_size=2.5", "data.batch_size=2.5: must be an integer >= 1"),
    ("detection", "ema.decay=1.5", "ema.decay=1.5: must be a number in (0, 1)"),
    ("classification", "optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be a number >= 0"),
])
def test_config_types_and_ranges_fail_before_data_is_read(run, override, message, tmp_path):
    """Issue #14: invalid values are one error naming the key, the value and what is allowed (schema)."""
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        if run in METHODS:
            run_pretraining(run, data=NO_DATA, logger="none", out=tmp_path, overrides=[override])
        else:
            run_finetune(run, data=NO_DATA, logger="none", out=tmp_path, overrides=[override])
