"""One registry: a method (pre-training) or task (fine-tuning) name -> its LightningModule,
DataModule and default YAML. Classes are imported lazily so `--help` stays fast."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.paths import CONFIG_DIR


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    module: str  # "package.module:ClassName" of the LightningModule
    datamodule: str  # "package.module:ClassName" of the LightningDataModule
    config: str  # YAML file name under configs/

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config

    def module_class(self) -> type:
        return _import(self.module)

    def datamodule_class(self) -> type:
        return _import(self.datamodule)


def _import(target: str) -> type:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


METHODS: dict[str, Entry] = {}
TASKS: dict[str, Entry] = {}


def register(table: dict[str, Entry], entry: Entry) -> Entry:
    if entry.name in table:
        raise ValueError(f"'{entry.name}' registered twice")
    table[entry.name] = entry
    return entry


register(METHODS, Entry(
    "montage",
    "Montage pre-training with ERF-adaptive dense classification (Zhou et al., ECCV 2020)",
    "lightning_modules.montage:MontageModule",
    "datamodules.montage:MontageDataModule",
    "montage.yaml",
))
register(METHODS, Entry(
    "fcmae", "ConvNeXt V2 FCMAE masked-image pre-training with GRN (Woo et al., CVPR 2023)",
    "lightning_modules.fcmae:FCMAEModule", "datamodules.masked:MaskedDataModule", "fcmae.yaml",
))
register(METHODS, Entry(
    "contrastive",
    "label-based pixel-wise contrastive pre-training for segmentation (Zhao et al., ICCV 2021)",
    "lightning_modules.contrastive:ContrastiveModule", "datamodules.distorted:DistortedDataModule",
    "contrastive.yaml",
))
register(METHODS, Entry(
    "supervised", "supervised classification with the Bag of Tricks (He et al., CVPR 2019): the ImageNet-style baseline",
    "lightning_modules.supervised:SupervisedModule", "datamodules.classification_pretrain:SupervisedDataModule",
    "supervised.yaml",
))

# Fine-tuning tasks (finetune.py --task NAME); run logic in cheaplunch/finetune.py.
register(TASKS, Entry(
    "detection",
    "object detection / instance segmentation: RetinaNet, Faster R-CNN, Mask R-CNN on an FPN; COCO AP",
    "lightning_modules.detection:DetectionModule",
    "datamodules.detection:DetectionDataModule",
    "finetune_detection.yaml",
))
register(TASKS, Entry(
    "segmentation",
    "semantic segmentation: DeepLabV3 head; mIoU (dataset-level confusion matrix)",
    "lightning_modules.segmentation:SegmentationModule",
    "datamodules.segmentation:SegmentationDataModule",
    "finetune_segmentation.yaml",
))
register(TASKS, Entry(
    "classification",
    "full fine-tuning (ConvNeXt V2 recipe switches) or linear probe on object crops / an ImageFolder; top-1 / top-5",
    "lightning_modules.classification:ClassificationModule",
    "datamodules.classification:ClassificationDataModule",
    "finetune_classification.yaml",
))


def lookup(table: dict[str, Entry], name: str, kind: str) -> Entry:
    if name not in table:
        choices = ", ".join(sorted(table)) or "(none)"
        raise UserError(f"unknown {kind} '{name}'; choices: {choices}")
    return table[name]


def describe(table: dict[str, Entry]) -> str:
    width = max((len(n) for n in table), default=0)
    return "\n".join(f"  {name:<{width}}  {entry.summary}" for name, entry in sorted(table.items()))
