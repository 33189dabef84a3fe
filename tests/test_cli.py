"""CLI and config: help lists methods, unknown names and keys fail with a one-line message."""

import subprocess
import sys

import pytest
import yaml

from cheaplunch.cli import config_flags, flag_overrides
from cheaplunch.config import load_config
from cheaplunch.registry import METHODS
from common.errors import UserError
from common.paths import CONFIG_DIR, REPO_ROOT


def _run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_registered_method():
    out = _run("--help")
    assert out.returncode == 0
    for name, entry in METHODS.items():
        assert name in out.stdout and entry.summary in out.stdout


def test_unknown_method_fails_with_choices():
    out = _run("--method", "nonsense")
    assert out.returncode == 2
    assert "unknown method 'nonsense'" in out.stderr and "montage" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_override_key_names_the_key():
    out = _run("--method", "montage", "optim.lrr=0.1", "--logger", "none")
    assert out.returncode == 2
    assert "optim.lrr" in out.stderr and "Traceback" not in out.stderr


def test_config_precedence(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"optim": {"lr": 0.5}, "trainer": {"max_steps": 7}}))
    overrides = flag_overrides(["trainer.max_steps=9"], devices=2, seed=3, data=None, num_nodes=None)
    cfg = load_config(CONFIG_DIR / "montage.yaml", user, overrides)
    assert cfg.optim.lr == 0.5  # --config beats the method default
    assert cfg.trainer.max_steps == 9  # key=value beats --config
    assert cfg.trainer.devices == 2 and cfg.seed == 3  # convenience flags
    assert cfg.optim.weight_decay == pytest.approx(1e-4)  # base default survives


def test_flags_reach_the_config_as_overrides_before_the_explicit_ones():
    from train import build_parser

    args = build_parser().parse_args(["--method", "montage", "--devices", "2", "--seed", "5", "--logger", "none",
                                      "--cache-dir", "/cache", "trainer.max_steps=3", "seed=6"])
    overrides = flag_overrides(args.overrides, **config_flags(args))
    assert sorted(overrides[:4]) == ["data.cache_dir=/cache", "logging.logger=none", "seed=5", "trainer.devices=2"]
    assert overrides[4:] == ["trainer.max_steps=3", "seed=6"]
    cfg = load_config(CONFIG_DIR / "montage.yaml", None, overrides)
    assert cfg.seed == 6 and cfg.logging.logger == "none" and cfg.trainer.devices == 2  # the explicit seed wins
    with pytest.raises(TypeError, match="colour"):
        flag_overrides(colour="red")  # the Python API refuses a flag the CLI does not have


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(UserError, match="bad.yaml"):
        load_config(CONFIG_DIR / "montage.yaml", bad)
    with pytest.raises(UserError, match="not found"):
        load_config(CONFIG_DIR / "montage.yaml", tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  momentun: 0.5\n")
    with pytest.raises(UserError, match="momentun"):
        load_config(CONFIG_DIR / "montage.yaml", typo)
    with pytest.raises(UserError, match="key=value"):
        load_config(CONFIG_DIR / "montage.yaml", None, ["trainer.max_steps"])


def test_every_registered_config_loads():
    for entry in METHODS.values():
        cfg = load_config(entry.config_path)
        assert cfg.model.arch
    load_config(CONFIG_DIR / "montage.yaml", CONFIG_DIR / "montage_paper.yaml")


def test_empty_mappings_take_any_keyword(tmp_path):
    cfg = load_config(CONFIG_DIR / "montage.yaml", None, ["model.backbone_kwargs.drop_path_rate=0.1",
                                                         "optim.layer_decay=0.9"])
    assert cfg.model.backbone_kwargs.drop_path_rate == 0.1 and cfg.optim.layer_decay == 0.9
    with pytest.raises(UserError, match="model.erf.nonsense"):
        load_config(CONFIG_DIR / "montage.yaml", None, ["model.erf.nonsense=1"])
