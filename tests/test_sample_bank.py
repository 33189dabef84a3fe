"""Sample bank rules (datamodules/sample_bank.py): positive expansion, IoU-0 negatives, aspect groups,
ratio, determinism, stored crops, caching. Also holds the tiny-COCO helpers test_montage_assembly uses.

The COCO sets are written here from real photos (scikit-image's bundled astronaut/coffee/chelsea/rocket)
cropped to random sizes, with random float boxes of every aspect group and non-contiguous category ids.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from common.errors import DataError, UserError
from datamodules.readers import load_coco
from datamodules.sample_bank import GROUPS, SampleBank, aspect_group_codes
from datamodules.sample_plan import NEGATIVES_AVOID, plan_samples


def aspect_group(width: float, height: float) -> str:
    return GROUPS[int(aspect_group_codes(np.array([width]), np.array([height]))[0])]


def montage_datamodule(*overrides: str):
    """A MontageDataModule built as train.py builds it: configs/montage.yaml with `overrides` (key=value)."""
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS
    from datamodules.montage import MontageDataModule

    return MontageDataModule(load_config(METHODS["montage"].config_path, overrides=list(overrides)))


CATEGORIES = [(3, "cat"), (7, "rocket"), (12, "cup")]  # arbitrary COCO ids -> labels 0, 1, 2

# ------------------------------------------------------------------------------------------------
# helpers (shared with test_montage_assembly.py)
# ------------------------------------------------------------------------------------------------


def _photos() -> list[np.ndarray]:
    import skimage.data as d

    return [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]


def write_coco(
    root: Path,
    *,
    n_images: int = 8,
    boxes_per_image: int = 6,
    seed: int = 0,
    aspects: tuple[float, ...] = (0.3, 0.45, 0.5, 1.0, 1.5, 2.2, 3.0),
    size_range: tuple[int, int] = (140, 300),
    box_side: tuple[float, float] = (12, 90),
) -> tuple[Path, Path]:
    """Write ``root/images/*.png`` (crops of real photos) and ``root/instances.json``; return both paths.

    Boxes have float coordinates, their w/h drawn from ``aspects`` (so every group occurs unless
    ``aspects`` says otherwise); some touch the image border so the expansion gets clipped."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ann_id = 100
    for i in range(n_images):
        src = photos[i % len(photos)]
        w = int(rng.integers(*size_range))
        h = int(rng.integers(*size_range))
        w, h = min(w, src.shape[1]), min(h, src.shape[0])
        x0 = int(rng.integers(0, src.shape[1] - w + 1))
        y0 = int(rng.integers(0, src.shape[0] - h + 1))
        img = np.ascontiguousarray(src[y0 : y0 + h, x0 : x0 + w])
        if rng.random() < 0.5:
            img = img[:, ::-1]
        name = f"img_{i:03d}.png"
        Image.fromarray(np.ascontiguousarray(img)).save(img_dir / name)
        img_id = 1000 + 7 * i  # non-contiguous ids
        images.append({"id": img_id, "file_name": name, "width": w, "height": h})
        for _ in range(boxes_per_image):
            a = float(rng.choice(aspects))
            side = float(rng.uniform(*box_side))
            bw, bh = side * np.sqrt(a), side / np.sqrt(a)
            bw, bh = min(bw, w - 1.0), min(bh, h - 1.0)
            if rng.random() < 0.2:  # flush with the left/top border
                bx, by = 0.0, 0.0
            else:
                bx = float(rng.uniform(0, w - bw))
                by = float(rng.uniform(0, h - bh))
            cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))][0]
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [round(bx, 2), round(by, 2), round(bw, 2), round(bh, 2)],
                         "area": bw * bh})
            ann_id += 1
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in CATEGORIES]}
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file, img_dir


def load(ann_file: Path, img_dir: Path, **kw):
    return load_coco(ann_file, img_dir, **kw)


def build(coco, out: Path, **kw) -> SampleBank:
    kw.setdefault("seed", 0)
    kw.setdefault("progress", False)
    return SampleBank.build(coco, out, **kw)


def gt_boxes_by_image(ann_file: Path) -> dict[int, np.ndarray]:
    """xyxy GT boxes per image id straight from the JSON (independent of the code under test)."""
    d = json.loads(Path(ann_file).read_text())
    out: dict[int, list] = {im["id"]: [] for im in d["images"]}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        out[a["image_id"]].append([x, y, x + w, y + h])
    return {k: np.array(v, np.float64).reshape(-1, 4) for k, v in out.items()}


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    ann, imgs = write_coco(root, n_images=10, boxes_per_image=8)
    return ann, imgs, load(ann, imgs)


@pytest.fixture(scope="module")
def bank(coco_set, tmp_path_factory):
    return build(coco_set[2], tmp_path_factory.mktemp("bank") / "b", max_side=10_000)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_group_boundaries_are_square():
    assert aspect_group(1, 2) == "S"  # w/h = 0.5 exactly
    assert aspect_group(3, 2) == "S"  # w/h = 1.5 exactly
    assert aspect_group(50, 101) == "T"
    assert aspect_group(151, 100) == "W"
    assert aspect_group(7, 7) == "S"
    codes = aspect_group_codes(np.array([10, 15, 4, 16]), np.array([20, 10, 9, 10]))
    assert [GROUPS[c] for c in codes] == ["S", "S", "T", "W"]


def test_positive_expansion_rules(coco_set, bank):
    ann, _, coco = coco_set
    d = json.loads(ann.read_text())
    by_id = {a["id"]: a for a in d["annotations"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
    pos = np.flatnonzero(bank.labels < bank.background_label)
    assert len(pos) == len(d["annotations"])  # every GT box (all >= 1 px here)
    ratios = []
    for i in pos:
        a = by_id[int(bank.ann_ids[i])]
        assert int(bank.image_ids[i]) == a["image_id"]
        x, y, w, h = a["bbox"]
        ex, ey, ew, eh = (int(v) for v in bank.source_boxes[i])
        W, H = sizes[a["image_id"]]
        # contains the original box
        assert ex <= x and ey <= y and ex + ew >= x + w and ey + eh >= y + h
        # inside the image
        assert ex >= 0 and ey >= 0 and ex + ew <= W and ey + eh <= H
        # each side at most 2x (of the whole-pixel hull of the box)
        hull_w = np.ceil(x + w) - np.floor(x)
        hull_h = np.ceil(y + h) - np.floor(y)
        assert ew <= 2 * hull_w and eh <= 2 * hull_h
        assert ew <= hull_w + w + 1e-6 and eh <= hull_h + h + 1e-6
        if x - w / 2 > 0 and y - h / 2 > 0 and x + 1.5 * w < W and y + 1.5 * h < H:  # not clipped
            ratios.append((ew / w, eh / h))
        cat_ids = coco.category_ids
        assert int(bank.category_ids[i]) == a["category_id"]
        assert int(bank.labels[i]) == cat_ids.index(a["category_id"])
    r = np.array(ratios)
    assert len(r) > 10
    # U[0, w/2] on each side: mean growth 1.5x (slightly less after flooring to whole pixels)
    assert 1.3 < r.mean() < 1.6
    assert r.max() > 1.7  # the expansion really reaches toward 2x


def test_negatives_have_iou_zero_with_every_gt_box(coco_set, bank):
    ann = coco_set[0]
    gt = gt_boxes_by_image(ann)
    neg = np.flatnonzero(bank.labels == bank.background_label)
    assert len(neg) > 0
    assert (bank.category_ids[neg] == -1).all() and (bank.ann_ids[neg] == -1).all()
    assert bank.background_label == len(CATEGORIES)
    for i in neg:
        x, y, w, h = (float(v) for v in bank.source_boxes[i])
        boxes = torch.tensor(gt[int(bank.image_ids[i])])
        iou = box_iou(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64), boxes)
        assert float(iou.max()) == 0.0, (i, iou)


def _xyxy(xywh: np.ndarray) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(xywh, np.float64).reshape(-1, 4))
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


@pytest.fixture(scope="module")
def banks_by_negatives_avoid(coco_set, tmp_path_factory) -> dict[str, SampleBank]:
    """One bank per data.negatives_avoid setting, one negative per positive (many negatives to check)."""
    root = tmp_path_factory.mktemp("avoid")
    return {avoid: build(coco_set[2], root / avoid, neg_ratio=1.0, negatives_avoid=avoid)
            for avoid in NEGATIVES_AVOID}


@pytest.mark.parametrize("negatives_avoid", ["boxes", "expanded_positives"])
def test_negatives_avoid_boxes_or_expanded_positives(coco_set, banks_by_negatives_avoid, negatives_avoid):
    """IoU 0 (torchvision's box_iou) of every negative with every GT box of its image (read from the JSON)
    in both settings, and with every expanded positive of its image for "expanded_positives". With
    "boxes" some negatives do overlap an expanded positive (on this set), so the setting matters."""
    bank = banks_by_negatives_avoid[negatives_avoid]
    gt = gt_boxes_by_image(coco_set[0])
    negatives = bank.labels == bank.background_label
    assert negatives.sum() > 30
    overlapping_expanded = 0
    for image_id in np.unique(bank.image_ids[negatives]):
        in_image = bank.image_ids == image_id
        neg_boxes = _xyxy(bank.source_boxes[in_image & negatives])
        expanded = _xyxy(bank.source_boxes[in_image & ~negatives])
        assert float(box_iou(neg_boxes, torch.as_tensor(gt[int(image_id)])).max()) == 0.0
        iou_expanded = box_iou(neg_boxes, expanded)
        overlapping_expanded += int((iou_expanded.max(dim=1).values > 0).sum())
    if negatives_avoid == "expanded_positives":
        assert overlapping_expanded == 0
    else:
        assert overlapping_expanded >= 5, overlapping_expanded
    assert bank.info["settings"]["negatives_avoid"] == negatives_avoid
    # same positives (the expansion does not depend on the setting)
    other = banks_by_negatives_avoid[next(a for a in NEGATIVES_AVOID if a != negatives_avoid)]
    np.testing.assert_array_equal(bank.source_boxes[~negatives], other.source_boxes[other.labels < other.background_label])


def test_unknown_negatives_avoid_is_a_clear_error(coco_set, tmp_path):

    coco = coco_set[2]
    for call in (lambda: plan_samples(coco, seed=0, negatives_avoid="positives"),
                 lambda: build(coco, tmp_path / "bad", negatives_avoid="positives"),
                 lambda: montage_datamodule("data.negatives_avoid=positives")):
        with pytest.raises(UserError, match="negatives_avoid must be one of expanded_positives, boxes, got 'positives'"):
            call()
    assert not (tmp_path / "bad").exists()


def test_cache_is_keyed_by_negatives_avoid(coco_set, tmp_path, caplog):
    """A bank built with one setting is rebuilt, not reused, for the other (SampleBank.build's settings),
    and the montage DataModule puts the two in different folders."""
    from types import SimpleNamespace


    ann, _, coco = coco_set
    out = tmp_path / "bank"
    with_boxes = build(coco, out, neg_ratio=1.0, negatives_avoid="boxes")
    boxes_negatives = with_boxes.source_boxes[with_boxes.labels == with_boxes.background_label].copy()
    with caplog.at_level(logging.INFO, logger="datamodules.sample_bank"):
        rebuilt = build(coco, out, neg_ratio=1.0, negatives_avoid="expanded_positives")
    assert "settings changed, rebuilding" in caplog.text
    assert rebuilt.info["settings"]["negatives_avoid"] == "expanded_positives"
    new_negatives = rebuilt.source_boxes[rebuilt.labels == rebuilt.background_label]
    assert new_negatives.shape != boxes_negatives.shape or not np.array_equal(new_negatives, boxes_negatives)
    paths = SimpleNamespace(root=tmp_path, train_ann=ann)
    folders = {montage_datamodule(f"data.negatives_avoid={a}").bank_path(paths) for a in NEGATIVES_AVOID}
    assert len(folders) == 2


def test_negative_sizes_follow_positive_sizes(bank):
    neg = bank.labels == bank.background_label
    pos_sizes = {tuple(s) for s in bank.source_boxes[~neg, 2:].tolist()}
    assert all(tuple(s) in pos_sizes for s in bank.source_boxes[neg, 2:].tolist())


def test_groups_match_stored_box_aspect(bank):
    w = bank.source_boxes[:, 2].astype(float)
    h = bank.source_boxes[:, 3].astype(float)
    expected = np.where(w / h < 0.5, "T", np.where(w / h > 1.5, "W", "S"))
    assert (bank.groups == expected).all()
    assert set(bank.groups) == {"S", "T", "W"}


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_negative_ratio(tmp_path, ratio):
    ann, imgs = write_coco(tmp_path, n_images=20, boxes_per_image=10, seed=3, box_side=(8, 40))
    plan = plan_samples(load(ann, imgs), seed=0, neg_ratio=ratio)
    n_pos = int((plan.category_ids >= 0).sum())
    n_neg = int((plan.category_ids < 0).sum())
    assert n_pos == 200
    assert n_neg + plan.negatives_short == int(np.floor(ratio * n_pos + 1e-9))
    assert abs(n_neg / n_pos - ratio) <= 0.02  # rejections may leave a few short


def test_crops_are_the_source_pixels(coco_set, bank):
    _, imgs, coco = coco_set
    paths = {im.id: im.path for im in coco.images}
    for i in range(0, len(bank), 3):
        src = np.asarray(Image.open(paths[int(bank.image_ids[i])]).convert("RGB"))
        x, y, w, h = (int(v) for v in bank.source_boxes[i])
        crop = bank.crop(i)
        assert crop.dtype == np.uint8 and crop.shape == (h, w, 3)
        np.testing.assert_array_equal(crop, src[y : y + h, x : x + w])
    assert (bank.stored_scale == 1).all()


def test_large_crops_are_capped(coco_set, tmp_path):
    _, _, coco = coco_set
    capped = build(coco, tmp_path / "capped", max_side=48)
    ref = build(coco, tmp_path / "full", max_side=10_000)
    np.testing.assert_array_equal(capped.source_boxes, ref.source_boxes)  # same plan
    assert (capped.shapes.max(axis=1) <= 48).all()
    big = np.flatnonzero(ref.shapes.max(axis=1) > 48)
    assert len(big) > 5
    for i in big[:10]:
        h, w = ref.shapes[i]
        f = 48 / max(h, w)
        expect = cv2.resize(ref.crop(i), (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(capped.crop(i), expect)
        assert capped.stored_scale[i] == pytest.approx(capped.shapes[i][1] / w)
    assert capped.directory.joinpath("crops.u8").stat().st_size < ref.directory.joinpath("crops.u8").stat().st_size


def test_deterministic_for_a_seed(coco_set, tmp_path):
    _, _, coco = coco_set
    a = build(coco, tmp_path / "a", seed=5)
    b = build(coco, tmp_path / "b", seed=5)
    c = build(coco, tmp_path / "c", seed=6)
    for name in ("offsets", "shapes", "labels", "group_codes", "image_ids", "source_boxes", "ann_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.directory / "crops.u8").read_bytes() == (b.directory / "crops.u8").read_bytes()
    n = min(len(a), len(c))
    assert not np.array_equal(a.source_boxes[:n], c.source_boxes[:n])
    assert (a.directory / "crops.u8").read_bytes() != (c.directory / "crops.u8").read_bytes()


def test_cached_and_rebuilt_only_when_settings_change(coco_set, tmp_path, caplog):
    ann, imgs, coco = coco_set
    out = tmp_path / "bank"
    build(coco, out)
    stamp = (out / "crops.u8").stat().st_mtime_ns
    info = json.loads((out / "bank_info.json").read_text())
    assert info["settings"]["seed"] == 0 and info["settings"]["neg_ratio"] == 0.1
    assert info["settings"]["ann_file"] == str(ann.resolve()) and info["settings"]["ann_size"] == ann.stat().st_size
    with caplog.at_level(logging.INFO, logger="datamodules.sample_bank"):
        build(coco, out)
    assert "reusing" in caplog.text
    assert (out / "crops.u8").stat().st_mtime_ns == stamp
    build(coco, out, neg_ratio=0.2)
    assert json.loads((out / "bank_info.json").read_text())["settings"]["neg_ratio"] == 0.2
    assert (out / "crops.u8").stat().st_mtime_ns != stamp
    # a changed annotation file (even the same content, re-saved) triggers a rebuild
    ann2 = tmp_path / "copy.json"
    ann2.write_text(ann.read_text() + " ")
    coco2 = load(ann2, imgs)
    bank2 = build(coco2, out, neg_ratio=0.2)
    assert bank2.info["settings"]["ann_file"] == str(ann2.resolve())


def test_counts_and_table(bank, caplog):
    counts = bank.counts()
    assert counts["total"] == len(bank)
    for c, name in enumerate(bank.class_names):
        for g in GROUPS:
            assert counts[f"{name}/{g}"] == int(((bank.labels == c) & (bank.groups == g)).sum())
        assert counts[f"{name}/total"] == int((bank.labels == c).sum())
    assert sum(counts[f"total/{g}"] for g in GROUPS) == len(bank)
    assert bank.class_names == ["cat", "rocket", "cup", "background"]
    assert bank.num_classes == 4 and bank.num_object_classes == 3
    with caplog.at_level(logging.INFO, logger="datamodules.sample_bank"):
        assert bank.log_counts() == counts
    assert "background" in caplog.text and "total" in caplog.text


def test_bank_pickles_without_the_mapped_bytes(bank):
    bank.crop(0)
    blob = pickle.dumps(bank)
    assert len(blob) < (bank.directory / "crops.u8").stat().st_size
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.crop(len(bank) - 1), bank.crop(len(bank) - 1))


def test_images_without_boxes_and_empty_sets(tmp_path):
    ann, imgs = write_coco(tmp_path, n_images=3, boxes_per_image=0)
    bank = build(load(ann, imgs), tmp_path / "empty")
    assert len(bank) == 0 and bank.counts()["total"] == 0


def test_size_mismatch_names_the_file(tmp_path):
    ann, imgs = write_coco(tmp_path, n_images=2, boxes_per_image=2)
    d = json.loads(ann.read_text())
    d["images"][0]["width"] += 5
    ann.write_text(json.dumps(d))
    coco = load(ann, imgs, check_images=False)  # so that the bank's own check is the one that fires
    with pytest.raises(DataError, match="img_000.png"):
        build(coco, tmp_path / "bad")
    assert not (tmp_path / "bad" / "bank_info.json").exists()


def test_negatives_avoid_crowd_regions(tmp_path):
    ann, imgs = write_coco(tmp_path, n_images=6, boxes_per_image=2, box_side=(10, 20))
    d = json.loads(ann.read_text())
    crowd = {}
    for im in d["images"]:  # a crowd region over the left 60% of every image
        box = [0.0, 0.0, 0.6 * im["width"], float(im["height"])]
        crowd[im["id"]] = box
        d["annotations"].append({"id": 10_000 + im["id"], "image_id": im["id"], "category_id": 3,
                                 "iscrowd": 1, "bbox": box, "area": box[2] * box[3]})
    ann.write_text(json.dumps(d))
    plan = plan_samples(load(ann, imgs), seed=0, neg_ratio=1.0)
    neg = np.flatnonzero(plan.category_ids < 0)
    assert len(neg) > 0
    assert len(plan.labels) - len(neg) == 12  # crowd boxes are not positives (keep_crowd=False)
    for i in neg:
        x, y, w, h = plan.boxes[i].tolist()
        cx, cy, cw, ch = crowd[int(plan.image_ids[i])]
        assert x >= cx + cw or x + w <= cx  # no overlap with the crowd region
