"""`--backbone PATH|scratch`: where the initial backbone weights of a fine-tuning run come from.

Accepted sources (all read with ``torch.load(..., weights_only=True)``: no pickled code is executed):

- ``scratch``: random initialisation (the from-scratch baseline); the architecture is ``--arch`` or the
  task config's ``model.arch``;
- an exported backbone (``backbone.pt`` + ``backbone.json``, see ``models/export.py``), or the folder
  holding them (e.g. a pre-training run folder);
- a Lightning checkpoint (``*.ckpt``) of any pre-training method (or of a fine-tuning run): its
  ``state_dict`` holds the backbone under ``backbone.*`` and ``hyper_parameters["config"]["model"]["arch"]``
  names the architecture;
- a plain timm ``state_dict`` file, when ``--arch`` names its architecture.

Loading is strict: a missing, unexpected or mis-shaped key is a ``UserError`` listing them (the usual
cause is a wrong ``--arch``), never a silent partial load.

A pre-trained DeepLab decoder (ASPP + 3x3 conv/BN, no classifier: what contrastive pre-training trains
under its projection head) comes along when there is one: ``decoder.pt`` beside an exported backbone, or
the ``embed.decoder.*`` weights of a contrastive Lightning checkpoint. ``BackboneSource.decoder`` holds it
in the key layout of torchvision's ``DeepLabHead`` without the final classifier (``0.*`` ASPP, ``1.*``
conv, ``2.*`` BN); segmentation fine-tuning starts its head from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from models.export import DECODER_FILE, load_state_strict, load_weights, read_backbone

SCRATCH = "scratch"
# Where every module of this project keeps its backbone in a Lightning checkpoint (PretrainModule and the
# fine-tuning modules).
CHECKPOINT_PREFIX = "backbone."
# torch.compile wraps a module as `_orig_mod`; the keys underneath are the model's own.
COMPILE_PREFIX = "_orig_mod."
# Where a contrastive checkpoint keeps its DeepLab decoder (lightning_modules/contrastive.py: self.embed.decoder).
DECODER_CHECKPOINT_PREFIX = "embed.decoder."


@dataclass
class BackboneSource:
    """Resolved `--backbone`: the architecture, its weights (None = scratch) and where they came from."""

    arch: str
    state: dict[str, torch.Tensor] | None
    description: str
    info: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, torch.Tensor] | None = None  # pre-trained DeepLab decoder (see the module docstring)
    decoder_rates: list[int] | None = None  # its ASPP atrous rates, when recorded

    @property
    def decoder_channels(self) -> int | None:
        """Width of the pre-trained decoder (output channels of its 3x3 conv ``1.weight``)."""
        weight = (self.decoder or {}).get("1.weight")
        return int(weight.shape[0]) if weight is not None else None

    @property
    def is_scratch(self) -> bool:
        return self.state is None


def _is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def backbone_from_checkpoint(ckpt: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(backbone state_dict, arch or None) from a loaded Lightning checkpoint dict."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"{path}: a Lightning checkpoint without a 'state_dict'")
    backbone = _strip(state, CHECKPOINT_PREFIX)
    if not backbone:
        heads = sorted({k.split(".")[0] for k in state})[:8]
        raise UserError(f"{path}: checkpoint has no backbone weights (no keys starting with "
                        f"{CHECKPOINT_PREFIX}; top-level names: {', '.join(heads)})")
    hparams = ckpt.get("hyper_parameters") or {}
    arch = None
    with contextlib.suppress(KeyError, TypeError):
        arch = hparams["config"]["model"]["arch"]
    return backbone, arch


def resolve_backbone(spec: str, arch: str | None = None, default_arch: str | None = None) -> BackboneSource:
    """Resolve `--backbone spec` (see the module docstring).

    `arch` is an explicit `--arch`: it wins over the architecture recorded in the file (and a wrong one
    then fails the strict load with the list of missing keys). `default_arch` (the config's model.arch)
    is used for `scratch` and for plain state_dict files when no `--arch` is given."""
    if spec is None or str(spec).strip() == "":
        raise UserError(f"--backbone: give a path (backbone.pt, its folder, a Lightning .ckpt) or '{SCRATCH}'")
    if str(spec) == SCRATCH:
        chosen = arch or default_arch
        if not chosen:
            raise UserError("--backbone scratch needs --arch NAME (or model.arch in the config)")
        return BackboneSource(chosen, None, f"scratch ({chosen}, random init)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--backbone: no such file or folder: {path} (give a backbone.pt, its folder, "
                        f"a Lightning .ckpt, or '{SCRATCH}')")
    if path.is_dir():
        if (path / "backbone.pt").is_file():
            path = path / "backbone.pt"
        elif (path / "checkpoints" / "last.ckpt").is_file():
            path = path / "checkpoints" / "last.ckpt"
        else:
            raise UserError(f"--backbone: folder {path} has neither backbone.pt nor checkpoints/last.ckpt")
    if path.with_suffix(".json").is_file() and path.suffix == ".pt":
        state, info = read_backbone(path)
        decoder_path = path.with_name(DECODER_FILE)
        decoder = load_weights(decoder_path, "decoder weights") if decoder_path.is_file() else None
        if decoder is not None and not _is_state_dict(decoder):
            raise UserError(f"{decoder_path}: not a state_dict of decoder weights")
        rates = (info.get("decoder") or {}).get("atrous_rates")
        return BackboneSource(arch or info["arch"], state, f"exported backbone {path} ({info['arch']})", info,
                              decoder=decoder, decoder_rates=rates)
    obj = load_weights(path, "backbone weights")
    if isinstance(obj, dict) and "state_dict" in obj and ("hyper_parameters" in obj or "pytorch-lightning_version" in obj):
        state, file_arch = backbone_from_checkpoint(obj, path)
        chosen = arch or file_arch
        if not chosen:
            raise UserError(f"{path}: the checkpoint does not record model.arch; pass --arch NAME")
        info = {"arch": file_arch, "global_step": obj.get("global_step"), "source": "lightning_checkpoint"}
        decoder = _strip(obj["state_dict"], DECODER_CHECKPOINT_PREFIX) or None
        rates = None
        with contextlib.suppress(KeyError, TypeError):
            rates = list(obj["hyper_parameters"]["config"]["model"]["atrous_rates"])
        return BackboneSource(chosen, state, f"Lightning checkpoint {path} ({file_arch})", info, decoder=decoder,
                              decoder_rates=rates)
    if _is_state_dict(obj):
        if arch is None:
            raise UserError(f"{path}: a plain state_dict without backbone.json beside it; pass --arch NAME "
                            "to say which timm architecture it is")
        return BackboneSource(arch, obj, f"state_dict {path} ({arch})", {"arch": arch})
    raise UserError(f"{path}: neither an exported backbone, a Lightning checkpoint nor a state_dict")


def prepare_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise a backbone state_dict for `module`: drop a torch.compile prefix, and fill BatchNorm
    `num_batches_tracked` counters that a frozen-BN model does not store (they do not affect the output)."""
    if state and all(k.startswith(COMPILE_PREFIX) for k in state):
        state = _strip(state, COMPILE_PREFIX)
    own = module.state_dict()
    filled = dict(state)
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros_like(value)
    return filled


def load_backbone_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state` into the backbone `module` (UserError listing every mismatch)."""
    load_state_strict(module, prepare_state(module, state), source)
