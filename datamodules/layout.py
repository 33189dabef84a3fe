"""Where a dataset's splits live: turn ``--data PATH`` (or nothing) into explicit paths.

Accepted:

- nothing (``None``): the embedded default at ``common.paths.DEFAULT_DATA_DIR``, built on demand (cached);
- a folder in the project layout::

      ROOT/images/{train,val}/            ROOT/annotations/instances_{train,val}.json
      ROOT/masks/{train,val}/             (optional: semantic label PNGs, one per image stem)

- a folder in COCO's own layout: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``;
- a small YAML file naming the paths (relative to the YAML's folder)::

      train_images: images/train
      val_images: images/val
      train_ann: annotations/train.json
      val_ann: annotations/val.json
      train_masks: masks/train      # optional
      val_masks: masks/val          # optional

Pre-training (montage, FCMAE) reads only the train split: ``resolve_dataset(..., need_val=False)`` accepts
a dataset without a val split (``val_images`` / ``val_ann`` are then None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.files import writable_folder


@dataclass
class DatasetPaths:
    root: Path
    train_images: Path
    val_images: Path | None  # None only with resolve_dataset(need_val=False) on a dataset without val
    train_ann: Path
    val_ann: Path | None
    train_masks: Path | None
    val_masks: Path | None


_PROJECT = ("images/train", "images/val", "annotations/instances_train.json", "annotations/instances_val.json")
_COCO = ("train2017", "val2017", "annotations/instances_train2017.json", "annotations/instances_val2017.json")
_YAML_REQUIRED = ("train_images", "val_images", "train_ann", "val_ann")
_YAML_TRAIN = ("train_images", "train_ann")
_YAML_VAL = ("val_images", "val_ann")
_YAML_OPTIONAL = ("train_masks", "val_masks")


def _masks(root: Path, split: str) -> Path | None:
    d = root / "masks" / split
    return d if d.is_dir() else None


def _from_yaml(path: Path, need_val: bool = True) -> DatasetPaths:
    from omegaconf import OmegaConf

    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # yaml errors come in several types
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(_YAML_REQUIRED + _YAML_OPTIONAL)}")
    required = _YAML_REQUIRED if need_val else _YAML_TRAIN
    optional = _YAML_OPTIONAL + (() if need_val else _YAML_VAL)
    unknown = sorted(set(spec) - set(required + optional))
    missing = [k for k in required if k not in spec]
    if unknown or missing:
        raise UserError(f"{path}: missing keys {missing}, unknown keys {unknown}; "
                        f"expected {', '.join(required)} and optionally {', '.join(optional)}")
    base = path.parent
    paths = {k: (base / str(v)) if spec.get(k) is not None else None for k, v in spec.items()}
    absent = [f"{k}: {p}" for k, p in paths.items() if p is not None and not p.exists()]
    if absent:
        raise UserError(f"{path}: these paths do not exist: {'; '.join(absent)}")
    return DatasetPaths(root=base, **{k: paths.get(k) for k in _YAML_REQUIRED + _YAML_OPTIONAL})


def resolve_dataset(root: str | Path | None, *, embedded_size: int = 300, seed: int = 0,
                    need_val: bool = True) -> DatasetPaths:
    """Resolve ``--data``; ``None`` builds (or reuses) the embedded dataset with ``embedded_size`` train
    images and ``seed``. ``need_val=False`` (pre-training) also accepts a dataset with only its train split.
    Anything unrecognised raises ``UserError`` listing what was expected and found."""
    if root is None:
        from common.paths import DEFAULT_DATA_DIR
        from tools.embedded import build_embedded

        root = build_embedded(DEFAULT_DATA_DIR, size=embedded_size, seed=seed)
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"dataset path not found: {root}")
    if root.is_file():
        if root.suffix.lower() in (".yaml", ".yml"):
            return _from_yaml(root, need_val)
        raise UserError(f"dataset path {root} is a file; give a dataset folder or a .yaml describing the splits")
    for layout, masks in ((_PROJECT, True), (_COCO, False)):
        train_images, val_images, train_ann, val_ann = (root / p for p in layout)
        if not (train_images.exists() and train_ann.exists()):
            continue
        if val_images.exists() and val_ann.exists():
            return DatasetPaths(root, train_images, val_images, train_ann, val_ann,
                                _masks(root, "train") if masks else None, _masks(root, "val") if masks else None)
        if not need_val:
            return DatasetPaths(root, train_images, None, train_ann, None, _masks(root, "train") if masks else None, None)
    found = sorted(str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.iterdir())
    found += sorted(f"annotations/{p.name}" for p in (root / "annotations").glob("*")) if (root / "annotations").is_dir() else []
    raise UserError(
        f"{root} is not a dataset folder I know. Expected either the project layout "
        f"({', '.join(_PROJECT)}; optional masks/train, masks/val) or COCO's layout ({', '.join(_COCO)}), "
        f"or a .yaml naming the paths{'' if need_val else ' (the val split is optional here)'}; "
        f"found: {', '.join(found[:30]) or 'an empty folder'}"
    )


CACHE_ENV = "CHEAPLUNCH_CACHE"  # overrides the default cache folder, like --cache-dir


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder for data derived from a dataset (montage sample banks, image checks); never the dataset's
    own folder, which may be read-only or shared. ``cache_dir`` (``--cache-dir`` / ``data.cache_dir``), else
    ``$CHEAPLUNCH_CACHE``, else ``$XDG_CACHE_HOME/cheaplunch`` (``~/.cache/cheaplunch``). Entries below it are
    keyed by the dataset's files, so datasets and settings never share one. Created on first use; a folder
    that cannot be written is a one-line UserError."""
    import os

    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cheaplunch"
    return writable_folder(Path(cache_dir).expanduser(), "the cache folder",
                           f"pass --cache-dir DIR (or set {CACHE_ENV}) to a writable folder")
