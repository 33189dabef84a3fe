"""Exported backbone format: `backbone.pt` (a plain state_dict in timm key layout, loadable with
`torch.load(..., weights_only=True)`) + `backbone.json` naming the architecture and its origin."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError

FORMAT_VERSION = 1


DECODER_FILE = "decoder.pt"  # a pre-trained DeepLab decoder written beside backbone.pt (contrastive runs)


def export_backbone(backbone: nn.Module, arch: str, out_dir: Path | str, **meta: Any) -> Path:
    """Write `backbone.pt` and `backbone.json` into out_dir; returns the .pt path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    torch.save(state, out_dir / "backbone.pt")
    info = {"format_version": FORMAT_VERSION, "library": "timm", "arch": arch,
            "num_parameters": sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)}
    info.update(meta)
    (out_dir / "backbone.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir / "backbone.pt"


def load_weights(path: Path | str, what: str = "weights") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or ONE line naming the file and saying why not:
    refused for safety (it holds pickled Python objects, which weights_only=True does not run), or
    unreadable (empty, truncated, corrupt, or not a torch file). Never torch's multi-line advice to retry
    with weights_only=False."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise UserError(f"{path}: {what} refused for safety: it holds a pickled Python object ({found.group(1)}), "
                            "which loading with weights_only=True does not run; re-save only its tensors (a state_dict)") from exc
        raise UserError(f"{path}: {what} unreadable: not a torch weights file (corrupt, or another kind of file)") from exc
    except EOFError as exc:
        raise UserError(f"{path}: {what} unreadable: the file is empty") from exc
    except Exception as exc:  # corrupt files fail in many types (RuntimeError, OSError, IndexError, ...)
        if not _starts_like_zip(path):
            raise UserError(f"{path}: {what} unreadable: not a torch weights file (corrupt, or another kind "
                            "of file)") from exc
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: {what} unreadable (truncated or corrupt zip archive)") from exc
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{path}: {what} unreadable ({type(exc).__name__}: {detail})") from exc


def _starts_like_zip(path: Path) -> bool:
    """The file starts like the zip archive torch.save writes (since torch 1.6)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def read_backbone(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an exported backbone (the .pt file or the folder holding it) -> (state_dict, info). An error
    names the file at fault: backbone.json (missing, not JSON, no 'arch') or backbone.pt (unreadable)."""
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.pt"
    if not path.is_file():
        raise UserError(f"backbone file not found: {path}")
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise UserError(f"{path}: missing {info_path.name} beside it (it names the architecture)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{info_path}: cannot read the exported backbone's description ({exc}); it names the "
                        f"architecture of {path.name}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("arch"), str):
        raise UserError(f"{info_path}: not an exported backbone's description (expected a JSON object with an 'arch')")
    state = load_weights(path, "exported backbone")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not an exported backbone (expected a state_dict of tensors)")
    return state, info


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   ignore_prefixes: tuple[str, ...] = ()) -> str:
    """'' when `state` fits a model whose state_dict is `own`, else a one-line list of the missing,
    unexpected and mis-shaped keys. Keys starting with an entry of `ignore_prefixes` may be missing."""
    missing = [k for k in own if k not in state and not k.startswith(ignore_prefixes)]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
        if keys:
            parts.append(f"{title} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    return "; ".join(parts)


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, failing with a list of missing/unexpected/mis-shaped keys instead of a
    silent partial load. Keys starting with an entry of `ignore_prefixes` are allowed to be missing."""
    problems = state_mismatch(module.state_dict(), state, ignore_prefixes)
    if problems:
        raise UserError(f"{source}: weights do not match the model; {problems}")
    module.load_state_dict(state, strict=False)
