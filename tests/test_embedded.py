"""The embedded dataset builder: exact visible-part annotations, determinism, caching, layout, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from common.errors import DataError, UserError
from common.paths import REPO_ROOT
from tools.embedded import builder as E
from tools.embedded import compositing as C
from tools.embedded import sources as S


def _disc_layer(radius: int, x: int, y: int, label: int, colour=(200, 40, 40), soft: float = 2.0) -> C.Layer:
    """A disc whose alpha falls linearly from 1 to 0 over ``soft`` pixels at its rim."""
    size = 2 * radius + 1
    yy, xx = np.mgrid[:size, :size]
    dist = np.hypot(yy - radius, xx - radius)
    alpha = np.clip((radius - dist) / soft, 0, 1).astype(np.float32)
    rgb = np.array(colour, np.float32) * alpha[..., None]
    return C.Layer(np.dstack([rgb, alpha]), x, y, label, "disc")


def _paste_alpha(layer: C.Layer, shape) -> np.ndarray:
    """Independent reference: the layer's alpha on an HxW canvas (by explicit loops over pixels)."""
    out = np.zeros(shape, np.float32)
    h, w = layer.rgba.shape[:2]
    for r in range(h):
        for c in range(w):
            y, x = layer.y + r, layer.x + c
            if 0 <= y < shape[0] and 0 <= x < shape[1]:
                out[y, x] = layer.rgba[r, c, 3]
    return out


def _tight_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_single_object_mask_is_alpha_above_threshold_clipped_to_image():
    bg = np.full((40, 50, 3), 90, np.uint8)
    layer = _disc_layer(radius=12, x=-5, y=20, label=3)  # sticks out left and bottom
    comp = C.composite(bg, [layer])
    (obj,) = comp.objects
    alpha = _paste_alpha(layer, bg.shape[:2])
    expected = alpha >= C.ALPHA_THRESHOLD
    assert np.array_equal(obj.mask, expected) and np.array_equal(obj.visible, expected)
    ann = C.coco_annotation(obj)
    assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), expected)
    assert ann["bbox"] == _tight_bbox(expected)
    assert ann["area"] == int(expected.sum())
    assert ann["category_id"] == 4
    assert ann["bbox"][0] == 0 and ann["bbox"][1] + ann["bbox"][3] == 40  # clipped at the borders
    # pixels: alpha blend of the disc colour over the background
    want = np.rint(90 * (1 - alpha[..., None]) + np.array([200, 40, 40]) * alpha[..., None])
    assert np.abs(comp.image.astype(int) - want).max() <= 1


def test_occlusion_visible_part_and_semantic_labels():
    bg = np.zeros((60, 60, 3), np.uint8)
    below = _disc_layer(radius=15, x=5, y=5, label=0)
    above = _disc_layer(radius=15, x=20, y=20, label=6, colour=(10, 200, 10))
    comp = C.composite(bg, [below, above])
    m0 = _paste_alpha(below, (60, 60)) >= 0.5
    a1 = _paste_alpha(above, (60, 60))
    m1 = a1 >= 0.5
    assert np.array_equal(comp.objects[0].visible, m0 & ~m1)
    assert np.array_equal(comp.objects[1].visible, m1)
    assert (m0 & m1).any() and comp.objects[0].keep and comp.objects[1].keep
    ann0 = C.coco_annotation(comp.objects[0])
    assert ann0["bbox"] == _tight_bbox(m0 & ~m1) and ann0["area"] == int((m0 & ~m1).sum())
    sem = comp.semantic
    soft = (a1 > 0.1) & (a1 < 0.9)
    assert (sem[soft] == 255).all()  # the top object's soft rim is ignore
    core0 = m0 & ~m1 & (sem != 255)
    assert core0.sum() > 100 and (sem[core0] == 1).all()
    assert (sem[m1 & ~soft] == 7).all()
    assert (sem[~m0 & ~m1 & (sem != 255)] == 0).all()


def test_nearly_hidden_object_is_not_annotated_and_ignored_in_semantic():
    bg = np.zeros((50, 50, 3), np.uint8)
    small = _disc_layer(radius=5, x=20, y=20, label=1)
    cover = C.Layer(np.dstack([np.full((30, 19, 3), 255, np.float32), np.ones((30, 19), np.float32)]), 10, 10, 2)
    comp = C.composite(bg, [small, cover], min_visible_area=10, min_visible_fraction=0.15)
    hidden = comp.objects[0]
    assert hidden.visible.sum() > 0 and not hidden.keep  # a sliver sticks out on the right
    assert (comp.semantic[hidden.visible] == 255).all()


def test_stamp_list_is_curated_and_splits_are_stamp_disjoint():
    stamps = S.read_stamp_list()
    assert 200 <= len(stamps) <= 350
    assert {s.cls for s in stamps} == set(S.CLASSES)
    assert all((S.STAMP_ROOT / s.path).is_file() for s in stamps)
    assert not any(s.path.startswith("symbols/") or "/cartoon/" in s.path or s.path.endswith("_mirror.png")
                   for s in stamps)
    pools = S.split_stamps(stamps)
    for split in S.SPLITS:
        assert sorted(pools[split]) == list(range(len(S.CLASSES)))  # every class in both splits
    train = {i for v in pools["train"].values() for i in v}
    val = {i for v in pools["val"].values() for i in v}
    assert not train & val and len(train | val) == len(stamps)


def test_colour_richness_separates_flat_drawings_from_photos():
    rng = np.random.default_rng(0)
    flat = np.zeros((64, 64, 4), np.uint8)
    flat[..., :3] = (200, 30, 30)
    flat[16:48, 16:48, :3] = (20, 20, 200)
    flat[..., 3] = 255
    photo = flat.copy()
    photo[..., :3] = rng.integers(0, 256, (64, 64, 3))
    assert S.colour_richness(flat) < 1 < 2 < S.colour_richness(photo)


def test_built_files_match_the_composites(tiny_embedded):
    root = tiny_embedded
    info = E.read_build_info(root)
    settings = {k: v for k, v in info["settings"].items() if k in E.EmbeddedConfig.__dataclass_fields__}
    cfg = E.EmbeddedConfig(**{**settings, "scale": tuple(settings.get("scale", E.EmbeddedConfig.scale))})
    comp = E.Compositor(cfg, S.read_stamp_list(), S.load_backgrounds())
    for split in S.SPLITS:
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for img in coco["images"]:
            index = img["id"] - 1
            c = comp.sample(split, index)
            kept = [o for o in c.objects if o.keep]
            anns = by_image.get(img["id"], [])
            assert len(anns) == len(kept)
            for ann, obj in zip(anns, kept):
                m = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert np.array_equal(m, obj.visible)
                assert ann["bbox"] == _tight_bbox(m) and ann["area"] == int(m.sum())
                assert ann["category_id"] == obj.label + 1
            stem = Path(img["file_name"]).stem
            sem = cv2.imread(str(root / "masks" / split / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(sem, c.semantic)
            jpg = cv2.cvtColor(cv2.imread(str(root / "images" / split / img["file_name"])), cv2.COLOR_BGR2RGB)
            mse = ((jpg.astype(np.float64) - c.image) ** 2).mean()
            assert 10 * np.log10(255**2 / mse) > 32  # PSNR of JPEG quality 92, 4:4:4


def test_semantic_png_consistent_with_instance_masks(tiny_embedded):
    root = tiny_embedded
    n_checked = 0
    for split in S.SPLITS:
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        for img in coco["images"]:
            sem = cv2.imread(str(root / "masks" / split / (Path(img["file_name"]).stem + ".png")),
                             cv2.IMREAD_UNCHANGED)
            assert sem.shape == (img["height"], img["width"])
            owner = np.zeros(sem.shape, np.int64)  # category of the instance covering each pixel
            for ann in coco["annotations"]:
                if ann["image_id"] != img["id"]:
                    continue
                m = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert not (owner[m] > 0).any(), "instance masks overlap"
                owner[m] = ann["category_id"]
                assert np.isin(sem[m], [ann["category_id"], 255]).all()
                n_checked += 1
            labelled = (sem != 0) & (sem != 255)
            assert np.array_equal(sem[labelled], owner[labelled])  # every class pixel is in its instance
            assert (owner[sem == 0] == 0).all()  # background pixels are in no instance
            assert set(np.unique(sem)) <= set(range(len(S.CLASSES) + 1)) | {255}
    assert n_checked > 10


def test_layout_split_sizes_and_categories(tiny_embedded):
    root = tiny_embedded
    for split, n in (("train", 12), ("val", 4)):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["images"]) == n
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco["categories"]] == list(S.CLASSES)
        files = sorted(p.name for p in (root / "images" / split).iterdir())
        assert files == sorted(i["file_name"] for i in coco["images"])
        assert sorted(p.stem for p in (root / "masks" / split).iterdir()) == [Path(f).stem for f in files]
        assert all(i["width"] == i["height"] == 128 for i in coco["images"])
        assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in coco["annotations"])
    train = {a["stamp"] for a in json.loads((root / "annotations/instances_train.json").read_text())["annotations"]}
    val = {a["stamp"] for a in json.loads((root / "annotations/instances_val.json").read_text())["annotations"]}
    assert train and val and not train & val


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("build_info.json", ".build.lock")}


def test_deterministic_for_a_seed(tmp_path):
    a = E.build_embedded(tmp_path / "a", size=5, seed=3, image_size=96, progress=False)
    b = E.build_embedded(tmp_path / "b", size=5, seed=3, image_size=96, progress=False)
    c = E.build_embedded(tmp_path / "c", size=5, seed=4, image_size=96, progress=False)
    ta, tb, tc = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    assert len(ta) == 2 * (5 + 1) + 2 and ta == tb
    assert ta["annotations/instances_train.json"] != tc["annotations/instances_train.json"]
    assert ta["images/train/000001.jpg"] != tc["images/train/000001.jpg"]


def test_cache_reused_when_settings_equal_and_rebuilt_when_they_change(tmp_path):
    root = tmp_path / "emb"
    E.build_embedded(root, size=3, seed=0, image_size=64, progress=False)
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text())  # a marker: a rebuild would rewrite this file
    stamp = ann.stat().st_mtime_ns
    E.build_embedded(root, size=3, seed=0, image_size=64, progress=False)
    assert ann.stat().st_mtime_ns == stamp
    E.build_embedded(root, size=4, seed=0, image_size=64, progress=False)
    assert E.read_build_info(root)["settings"]["size"] == 4
    assert len(json.loads(ann.read_text())["images"]) == 4
    E.build_embedded(root, size=4, seed=1, image_size=64, progress=False)
    assert E.read_build_info(root)["settings"]["seed"] == 1
    # an interrupted build (complete: false) is rebuilt
    info = E.read_build_info(root)
    info["complete"] = False
    (root / "build_info.json").write_text(json.dumps(info))
    E.build_embedded(root, size=4, seed=1, image_size=64, progress=False)
    assert E.read_build_info(root)["complete"] is True


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not built by tools.embedded"):
        E.build_embedded(tmp_path, size=2, image_size=64, progress=False)
    assert (tmp_path / "images" / "train" / "mine.jpg").exists()


def test_missing_debian_packages_give_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "STAMP_ROOT", tmp_path / "nope")
    with pytest.raises(DataError, match="apt-get install -y tuxpaint-stamps-default mate-backgrounds"):
        E.build_embedded(tmp_path / "out", size=2, image_size=64, progress=False)


def test_stamp_missing_from_the_package_is_named(tmp_path, monkeypatch):
    tsv = tmp_path / "stamps.tsv"
    tsv.write_text(S.STAMP_LIST.read_text() + "animals/birds/dodo.png\tbird\n")
    monkeypatch.setattr(S, "STAMP_LIST", tsv)
    with pytest.raises(DataError, match=r"1 stamps listed .* missing .*dodo\.png.*apt-get install"):
        E.build_embedded(tmp_path / "out", size=2, image_size=64, progress=False)
    tsv.write_text("animals/birds/crow.png\tdinosaur\n")
    with pytest.raises(DataError, match="stamps.tsv:1: expected"):
        S.read_stamp_list()


def test_cli_builds_and_writes_a_preview(tmp_path):
    out, preview = tmp_path / "ds", tmp_path / "preview.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.embedded", "--out", str(out), "--size", "4", "--seed", "1",
         "--image-size", "96", "--preview", str(preview)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "annotations" / "instances_val.json").is_file()
    grid = cv2.imread(str(preview))
    assert grid is not None and grid.shape[0] >= 96 and grid.shape[1] >= 3 * 96
    again = subprocess.run(  # preview only: the existing 4-image build is shown, not rebuilt at 300
        [sys.executable, "-m", "tools.embedded", "--out", str(out), "--preview", str(tmp_path / "p2.png")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert E.read_build_info(out)["settings"]["size"] == 4 and (tmp_path / "p2.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "tools.embedded", "--out", str(out), "--size", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "size >= 1" in bad.stderr
