"""`finetune.py` behind the CLI: resolve the task, config, backbone and run folder; fine-tune; evaluate;
write ``results.json``.

Run folder (``--out``, default ``runs/finetune_<task>``)::

    config.yaml          the resolved config (model.num_classes / data.class_names filled from the data)
    checkpoints/         last.ckpt (resume), step*.ckpt, final.ckpt (the evaluated weights)
    results.json         the final metrics (the task's format, see README)
    history.json         [{"step": s, "metrics": {...}}, ...] for every evaluation during training
    images/              prediction drawings (also on W&B)

``--eval-only --checkpoint CKPT`` rebuilds the model from the checkpoint's own config, loads its weights
strictly and writes ``results.json`` (default folder: ``<run of CKPT>/eval``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cheaplunch.checks import check_config
from cheaplunch.cli import flag_overrides
from cheaplunch.config import _load_yaml, _merge, load_config
from cheaplunch.registry import TASKS, Entry, lookup
from cheaplunch.runner import (
    apply_slurm_environment,
    build_trainer,
    default_run_dir,
    fit_in_run_dir,
    make_logger,
    make_run_dir,
    write_run_config,
)
from common.errors import UserError
from models import DETECTORS
from models.backbone_loading import SCRATCH, BackboneSource, resolve_backbone
from models.export import load_state_strict, load_weights

log = logging.getLogger("cheaplunch")


@dataclass
class FinetuneResult:
    run_dir: Path
    results: dict[str, Any]
    checkpoint: Path | None


def check_task_flags(task: str | None, *, eval_only: bool, arch: str | None, detector: str | None = None,
                     label_fraction: float | None = None, label_count: int | None = None) -> None:
    """The task flags' own rules, checked before they become overrides (a flag that would be ignored is an error)."""
    if eval_only:
        given = [name for name, value in (("--arch", arch), ("--detector", detector),
                                          ("--label-fraction", label_fraction), ("--label-count", label_count))
                 if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: training options; --eval-only evaluates the checkpoint as it was "
                            "trained")
    if detector is not None:
        if task != "detection":
            raise UserError(f"--detector applies to --task detection only (got --task {task})")
        if detector not in DETECTORS:
            raise UserError(f"--detector must be one of {', '.join(DETECTORS)}, got '{detector}'")
    if label_fraction is not None and label_count is not None:
        raise UserError("give --label-fraction or --label-count, not both")


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@rank_zero_only
def _write_outputs(run_dir: Path, results: dict[str, Any], history: list[dict[str, Any]] | None) -> None:
    _write_json(run_dir / "results.json", results)
    if history is not None:
        _write_json(run_dir / "history.json", history)


def _describe_data(entry: Entry, cfg: DictConfig) -> Any:
    """The task's DataModule, with model.num_classes and data.class_names filled in from the data (values
    the config sets must agree with the data)."""
    datamodule = entry.datamodule_class()(cfg)
    names = list(datamodule.class_names)
    known = cfg.model.get("num_classes")
    if known is not None and int(known) != len(names):
        raise UserError(f"model.num_classes={known} but the dataset has {len(names)} classes ({', '.join(names[:12])})")
    given = cfg.data.get("class_names")
    if given is not None and list(given) != names:
        raise UserError(f"data.class_names={list(given)} but the dataset's classes are {names} (in this order); "
                        "set data.class_names=null to take them from the data")
    _set(cfg, "model.num_classes", len(names))
    _set(cfg, "data.class_names", names)
    return datamodule


def _pretrained_decoder(module_class: type, cfg: DictConfig, source: BackboneSource) -> tuple[dict[str, Any], str]:
    """Keyword arguments that hand a pre-trained DeepLab decoder (contrastive pre-training's ASPP) to the
    task module, and a note saying what happened to it ('' when the source has none)."""
    if source.decoder is None:
        return {}, ""
    if not getattr(module_class, "takes_pretrained_decoder", False):
        return {}, f"the pre-trained decoder of {source.description} is not used (this task has no DeepLab head)"
    if not cfg.model.get("pretrained_decoder", True):
        return {}, "model.pretrained_decoder=false: the DeepLab head starts from random weights"
    # the head takes the pre-trained decoder's shape
    shape = {"decoder_channels": source.decoder_channels, "atrous_rates": source.decoder_rates}
    changed = []
    for key, value in shape.items():
        if value is not None and cfg.model.get(key) != value:
            _set(cfg, f"model.{key}", value)
            changed.append(f"model.{key}={value}")
    return ({"decoder_state": source.decoder, "decoder_source": f"decoder of {source.description}"},
            f"DeepLab head: ASPP + 3x3 conv/BN from {source.description}"
            + (f" ({', '.join(changed)} to match it)" if changed else "")
            + "; classifier random (model.pretrained_decoder=false to start the whole head from random)")


def run_finetune(
    task: str | None,
    *,
    backbone: str | None = None,
    arch: str | None = None,
    config: str | None = None,
    out: Path | str | None = None,
    resume: str = "auto",
    eval_only: bool = False,
    checkpoint: str | None = None,
    overrides: Sequence[str] = (),
    **flags: Any,
) -> FinetuneResult:
    """Fine-tune (or with `eval_only`, evaluate `checkpoint`) and write results.json; see the module docstring.
    ``flags`` are the config flags of the CLI (data=, seed=, logger=, detector=, label_fraction=, ... see
    cheaplunch.cli.FLAG_KEYS), applied as overrides before ``overrides``; ``arch`` picks the backbone's
    architecture (default: the one recorded with the backbone, else model.arch)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_task_flags(task, eval_only=eval_only, arch=arch, **{name: flags.get(name) for name in
                                                               ("detector", "label_fraction", "label_count")})
    overrides = flag_overrides(overrides, **flags)
    if eval_only:
        if backbone not in (None, SCRATCH) and backbone:
            raise UserError("--eval-only evaluates --checkpoint; --backbone is for training")
        return evaluate_checkpoint(task, checkpoint, config=config, out=out, overrides=overrides)
    if checkpoint is not None:
        raise UserError("--checkpoint is for --eval-only; to continue a run use --resume CKPT, to start from "
                        "pre-trained weights use --backbone PATH")
    if task is None:
        raise UserError(f"--task is required (choices: {', '.join(sorted(TASKS))})")
    entry = lookup(TASKS, task, "task")
    cfg = load_config(entry.config_path, config, overrides)
    check_config(cfg, task=task)
    spec = backbone if backbone is not None else str(cfg.model.backbone)
    source: BackboneSource = resolve_backbone(spec, arch, default_arch=str(cfg.model.arch))
    notes = []  # printed once the data is known to be readable, so that an error is the only output
    if source.arch != cfg.model.arch:
        notes.append(f"model.arch: {source.arch} (from {source.description})")
        cfg.model.arch = source.arch
    cfg.model.backbone = str(spec)
    if source.is_scratch and cfg.model.get("norm_scratch") and cfg.model.get("norm") != cfg.model.norm_scratch:
        notes.append(f"--backbone scratch: model.norm={cfg.model.norm_scratch} (model.norm_scratch) instead of "
                     f"{cfg.model.norm}, which would freeze random-init statistics")
        cfg.model.norm = cfg.model.norm_scratch
    decoder_kwargs, decoder_note = _pretrained_decoder(entry.module_class(), cfg, source)
    if decoder_note:
        notes.append(decoder_note)
    job = apply_slurm_environment(cfg)
    run_dir = make_run_dir(Path(out or default_run_dir(f"finetune_{task}", job)).resolve())
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = _describe_data(entry, cfg)
    for note in notes:
        rank_zero_info(note)

    write_run_config(cfg, run_dir)
    rank_zero_info(f"{task}: {cfg.model.arch} from {source.description}; {cfg.model.num_classes} classes")
    module = entry.module_class()(cfg, backbone_state=source.state, backbone_source=source.description,
                                  **decoder_kwargs)
    trainer = fit_in_run_dir(cfg, run_dir, module, datamodule, resume=resume, export=False)
    final = run_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(final, weights_only=False)
    # Evaluate the final weights, unless training just did so at this very step.
    last = module.history[-1] if module.history else None
    if last is None or last["step"] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    results = module.results
    _write_outputs(run_dir, results, module.history)
    rank_zero_info(f"results: {json.dumps(results)}\nrun folder: {run_dir}")
    return FinetuneResult(run_dir, results, final)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint loaded with weights_only=True (UserError naming the file otherwise)."""
    if not path.is_file():
        raise UserError(f"--checkpoint: file not found: {path}")
    ckpt = load_weights(path, "checkpoint")  # one line naming the file: unreadable, or refused for safety
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"--checkpoint {path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def evaluate_checkpoint(
    task: str | None,
    checkpoint: str | None,
    *,
    config: str | None = None,
    out: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> FinetuneResult:
    """Evaluate a fine-tuning checkpoint on the val split of its dataset (or `--data`); writes results.json.
    ``overrides`` (e.g. data.root=..., trainer.devices=...) go over the checkpoint's saved config."""
    if checkpoint is None:
        raise UserError("--eval-only needs --checkpoint CKPT (a checkpoint of a finetune.py run)")
    path = Path(checkpoint).expanduser()
    ckpt = read_checkpoint(path)
    try:
        saved = ckpt["hyper_parameters"]["config"]
        saved_task = saved["task"]
    except (KeyError, TypeError):
        raise UserError(f"--checkpoint {path}: not a finetune.py checkpoint (no hyper_parameters.config.task); "
                        "a pre-training checkpoint is used with --backbone instead") from None
    if task is not None and task != saved_task:
        raise UserError(f"--task {task} but --checkpoint {path} is a '{saved_task}' checkpoint")
    entry = lookup(TASKS, saved_task, "task")
    cfg = OmegaConf.create(saved)
    OmegaConf.set_struct(cfg, True)
    # The saved config is the base; --config / --data / key=value may change e.g. data.num_workers.
    if config is not None:
        cfg = _merge(cfg, _load_yaml(Path(config)), str(config))
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), f"overrides {list(overrides)}")
    check_config(cfg, task=saved_task, training=False)
    saved_names = list(cfg.data.class_names or [])
    datamodule = entry.datamodule_class()(cfg)
    names = list(datamodule.class_names)
    if saved_names and names != saved_names:
        raise UserError(f"--checkpoint {path} was trained on classes {saved_names} but the data has {names}")
    module = entry.module_class()(cfg)
    load_state_strict(module, ckpt["state_dict"], f"--checkpoint {path}")
    if out is None:
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        out = run / "eval"
    run_dir = make_run_dir(Path(out).resolve())
    pl_logger = make_logger(str(cfg.logging.logger), run_dir, cfg)
    trainer = build_trainer(cfg, run_dir, [], pl_logger)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    results = module.results
    _write_outputs(run_dir, results, None)
    rank_zero_info(f"results: {json.dumps(results)}\nwritten to {run_dir / 'results.json'}")
    return FinetuneResult(run_dir, results, path)
