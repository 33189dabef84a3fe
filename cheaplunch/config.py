"""Config loading: base defaults <- method/task YAML <- --config FILE <- dotted key=value overrides.

Uses OmegaConf in struct mode, so a misspelt override key is an error naming the key instead of
being silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from common.errors import UserError
from common.paths import CONFIG_DIR

BASE_CONFIG = CONFIG_DIR / "base.yaml"


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: expected a mapping at top level")
    return cfg


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as exc:
        raise UserError(f"{source}: unknown config key '{exc.full_key}'") from exc
    except OmegaConfBaseException as exc:
        raise UserError(f"{source}: {exc.msg}") from exc


def load_config(
    default_yaml: Path | str,
    user_yaml: Path | str | None = None,
    overrides: Iterable[str] = (),
    base_yaml: Path | str | None = BASE_CONFIG,
) -> DictConfig:
    """Resolve the run config. Keys not present in the base/default files are rejected."""
    cfg = _load_yaml(Path(base_yaml)) if base_yaml is not None else OmegaConf.create({})
    # The method file may add new keys (its own model/loss sections), so merge it before struct mode.
    cfg = OmegaConf.merge(cfg, _load_yaml(Path(default_yaml)))
    OmegaConf.set_struct(cfg, True)
    _open_empty_mappings(cfg)
    if user_yaml is not None:
        cfg = _merge(cfg, _load_yaml(Path(user_yaml)), str(user_yaml))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. trainer.max_steps=20)")
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except ConfigKeyError as exc:
            raise UserError(f"unknown config key '{exc.full_key}' in overrides {overrides}") from exc
        except OmegaConfBaseException as exc:
            raise UserError(f"bad override {overrides}: {exc.msg}") from exc
    return cfg


def _open_empty_mappings(node: DictConfig) -> None:
    """An empty mapping in a default config (e.g. `model.backbone_kwargs: {}`) is a bag of keyword
    arguments for a library: it accepts any key, while every other section rejects unknown keys."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if len(child) == 0:
                OmegaConf.set_struct(child, False)
            else:
                _open_empty_mappings(child)


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
