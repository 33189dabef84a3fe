"""Label fractions mean the same images everywhere (issue #12 §2): fine-tuning with ``--label-fraction F``,
montage's sample bank and the supervised arm's object crops all use the first round(F * n) images of one
seeded permutation of the train images (reader order), recomputed here by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

FRACTION = 0.5


def _labelled_ids(root, fraction: float = FRACTION, seed: int = 0) -> set[int]:
    images = json.loads((root / "annotations" / "instances_train.json").read_text())["images"]
    k = int(np.floor(fraction * len(images) + 0.5))
    order = np.random.default_rng(seed).permutation(len(images))
    return {int(images[i]["id"]) for i in order[:k]}


def test_montage_bank_is_cut_from_the_finetuning_subset(tiny_embedded, tmp_path):
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS
    from datamodules.montage import MontageDataModule

    common = [f"data.root={tiny_embedded}", "data.batch_size=2", "data.num_workers=0", "data.canvas=64",
              "data.pin_memory=false", f"data.cache_dir={tmp_path / 'cache'}"]
    subset = MontageDataModule(load_config(METHODS["montage"].config_path,
                                                       overrides=[*common, f"data.label_fraction={FRACTION}"]))
    subset.setup("fit")
    full = MontageDataModule(load_config(METHODS["montage"].config_path, overrides=common))
    full.setup("fit")
    chosen = _labelled_ids(tiny_embedded)
    assert set(subset.bank.image_ids.tolist()) <= chosen
    assert set(full.bank.image_ids.tolist()) - chosen  # the restriction acts: the full bank has other images
    assert subset.bank.directory != full.bank.directory  # separate cache entries


def test_detection_finetuning_uses_the_same_subset(tiny_embedded):
    from cheaplunch.config import load_config
    from cheaplunch.registry import TASKS
    from datamodules.detection import DetectionDataModule

    cfg = load_config(TASKS["detection"].config_path,
                      overrides=[f"data.root={tiny_embedded}", f"data.label_fraction={FRACTION}"])
    dm = DetectionDataModule(cfg)
    dm.setup("fit")
    used = {dm.train_coco.images[i].id for i in dm.train_set.indices}
    assert used <= _labelled_ids(tiny_embedded) and used


@pytest.mark.parametrize("fraction", [FRACTION, 1.0])
def test_supervised_crops_come_from_the_labelled_images_only(tiny_embedded, fraction):
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS
    from datamodules.classification_pretrain import SupervisedDataModule

    cfg = load_config(METHODS["supervised"].config_path,
                      overrides=[f"data.root={tiny_embedded}", f"data.label_fraction={fraction}"])
    dm = SupervisedDataModule(cfg)
    dm.setup("fit")
    data = json.loads((tiny_embedded / "annotations" / "instances_train.json").read_text())
    chosen = _labelled_ids(tiny_embedded, fraction)
    min_box = float(cfg.data.min_box_size)
    expected = sum(1 for a in data["annotations"] if a["image_id"] in chosen and max(a["bbox"][2:]) >= min_box)
    assert len(dm.train_rows) == expected
