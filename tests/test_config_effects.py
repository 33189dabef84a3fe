"""Every option acts as its config says, or the run stops at start-up with a clear error (issue #11: a silent
no-op is a defect). Start-up checks are run with a --data path that does not exist, so the test also shows
that the error comes before any data is read."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf

from cheaplunch.config import BASE_CONFIG
from cheaplunch.errors import UserError
from cheaplunch.finetune import run_finetune
from cheaplunch.pretrain import run_pretraining
from cheaplunch.registry import METHODS
from lightning_modules.base import PretrainModule

NO_DATA = "/nonexistent/cheaplunch-test-data"


def _base_cfg(arch: str, *overrides: str, **backbone_kwargs) -> DictConfig:
    """base.yaml with a model section: enough for a bare PretrainModule."""
    cfg = OmegaConf.merge(OmegaConf.load(BASE_CONFIG), {"model": {"arch": arch, "backbone_kwargs": backbone_kwargs}},
                          OmegaConf.from_dotlist(list(overrides)))
    assert isinstance(cfg, DictConfig)
    return cfg


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
