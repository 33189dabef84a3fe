"""Readers of user datasets (COCO, segmentation folders, ImageFolder) and dataset path resolution."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.paths
from common.errors import DataError, DataWarning, UserError
from datamodules import readers as R
from datamodules import segmentation_readers as SR
from datamodules.layout import resolve_dataset
from tools.embedded import CLASSES


def _save(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette:  # a VOC-style label PNG: palette indices are the class values
        im = Image.frombytes("P", im.size, array.tobytes())
        im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    im.save(path)
    return path


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------- read_image
def test_read_image_formats_and_errors(tmp_path):
    rgb = _rgb()
    assert np.array_equal(R.read_image(_save(tmp_path / "a.png", rgb)), rgb)
    gray = R.read_image(_save(tmp_path / "g.png", rgb[..., 0]))
    assert gray.shape == (20, 30, 3) and gray.dtype == np.uint8
    rgba = R.read_image(_save(tmp_path / "rgba.png", np.dstack([rgb, np.full((20, 30), 255, np.uint8)])))
    assert rgba.shape == (20, 30, 3)
    with pytest.raises(DataError, match="missing.jpg"):
        R.read_image(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="junk.jpg"):
        R.read_image(tmp_path / "junk.jpg")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        R.read_image(tmp_path / "cut.jpg")



def _gradient16(h=4, w=256) -> np.ndarray:
    return (np.arange(w, dtype=np.uint16) * 257).reshape(1, w).repeat(h, 0)  # 0, 257, ..., 65535


def test_read_image_scales_high_bit_depth_to_8_bits(tmp_path):
    """Issue #14: a 16-bit grey PNG (PIL mode I;16) read as white (convert('RGB') clips at 255); it must
    read as the same gradient in 8 bits, and every DataModule reads through read_image."""
    g16 = _gradient16()
    want = np.arange(256, dtype=np.uint8).reshape(1, 256).repeat(4, 0)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    got = R.read_image(tmp_path / "g16.png")
    assert got.dtype == np.uint8 and got.shape == (4, 256, 3)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    # big-endian 16-bit, 32-bit integer (I) holding 16-bit values, float (F) in [0, 1]
    Image.frombytes("I;16B", (256, 4), g16.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    Image.fromarray(g16.astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(g16.astype(np.float32) / 65535).save(tmp_path / "f32.tif")
    for name in ("g16b.tif", "i32.tif", "f32.tif"):
        np.testing.assert_array_equal(R.read_image(tmp_path / name)[..., 0], want, err_msg=name)
    # 16-bit colour (PIL reduces it to 8 bits itself) and a file only OpenCV decodes (float PFM)
    import cv2

    rgb16 = np.stack([g16, g16 // 2, 65535 - g16], axis=-1)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1].copy())
    got = R.read_image(tmp_path / "rgb16.png")
    np.testing.assert_allclose(got.astype(int), np.rint(rgb16 / 257).astype(int), atol=1)
    cv2.imwrite(str(tmp_path / "rgb.pfm"), (rgb16[..., ::-1] / 65535).astype(np.float32))
    np.testing.assert_allclose(R.read_image(tmp_path / "rgb.pfm").astype(int), np.rint(rgb16 / 257).astype(int), atol=1)
    # ImageFolder (classification) goes through the same reader
    (tmp_path / "folder" / "cls").mkdir(parents=True)
    Image.fromarray(g16).save(tmp_path / "folder" / "cls" / "a.png")
    sample, _ = R.image_folder(tmp_path / "folder")[0]
    np.testing.assert_array_equal(np.asarray(sample)[..., 1], want)
    # a range that cannot be mapped is an error naming the file, not a wrong picture
    Image.fromarray(np.full((4, 4), 2.5, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(DataError, match=r"hdr\.tif: float image with values in \[2\.5, 2\.5\]"):
        R.read_image(tmp_path / "hdr.tif")
    Image.fromarray(np.full((4, 4), -3, np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(DataError, match=r"neg\.tif: integer image"):
        R.read_image(tmp_path / "neg.tif")

# ------------------------------------------------------------------------------------------- COCO
def _coco(tmp_path: Path, images=None, annotations=None, categories=None, make_files=True) -> Path:
    images = images if images is not None else [
        {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
        {"id": 2, "file_name": "sub/b.jpg", "width": 40, "height": 40},
        {"id": 7, "file_name": "neg.jpg", "width": 30, "height": 30},  # no annotations: a negative
    ]
    categories = categories if categories is not None else [
        {"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"},
    ]
    annotations = annotations if annotations is not None else [
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [10, 5, 20, 10], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 90, "bbox": [90, 40, 20, 20], "iscrowd": 0},  # clipped
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [-4, -4, 10, 10]},  # clipped
        {"id": 13, "image_id": 2, "category_id": 1, "bbox": [50, 50, 5, 5], "iscrowd": 0},  # fully outside
        {"id": 14, "image_id": 2, "category_id": 1, "bbox": [3, 3, 0, 8], "iscrowd": 0},  # zero area
        {"id": 15, "image_id": 2, "category_id": 90, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd
        {"id": 16, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 0},  # exactly inside
    ]
    ann_file = tmp_path / "annotations" / "instances_train.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    if make_files:
        for img in images:
            _save(tmp_path / "images" / img["file_name"], _rgb(img["height"], img["width"]))
    return ann_file


def test_load_coco_maps_ids_clips_drops_and_keeps_negatives(tmp_path):
    ann = _coco(tmp_path)
    with pytest.warns(DataWarning) as record:
        ds = R.load_coco(ann, tmp_path / "images")
    assert len(record) == 1
    assert str(record[0].message) == f"{ann}: clipped 2 boxes, dropped 2 degenerate boxes"
    assert ds.category_ids == [1, 5, 90] and ds.class_names == ["person", "airplane", "toothbrush"]
    assert ds.num_classes == 3 and [ds.label_of(c) for c in (1, 5, 90)] == [0, 1, 2]
    with pytest.raises(DataError, match="unknown category id 2"):
        ds.label_of(2)
    by_id = {im.id: im for im in ds.images}
    assert sorted(by_id) == [1, 2, 7]
    a = by_id[1]
    assert a.path == tmp_path / "images" / "a.jpg" and (a.width, a.height) == (100, 50)
    np.testing.assert_array_equal(a.boxes, np.array([[10, 5, 20, 10], [90, 40, 10, 10], [0, 0, 6, 6]], np.float32))
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    np.testing.assert_array_equal(a.labels, [1, 2, 0])
    np.testing.assert_array_equal(a.category_ids, [5, 90, 1])
    np.testing.assert_array_equal(a.ann_ids, [10, 11, 12])
    b = by_id[2]
    np.testing.assert_array_equal(b.ann_ids, [16])  # outside, zero-area and crowd boxes are gone
    neg = by_id[7]
    assert neg.boxes.shape == (0, 4) and neg.labels.shape == (0,) and neg.ann_ids.dtype == np.int64
    # evaluation sees what the loader kept: clipped boxes, the crowd region as crowd, no degenerate box
    assert set(ds.coco.getAnnIds()) == {10, 11, 12, 15, 16}
    assert ds.coco.anns[11]["bbox"] == [90, 40, 10, 10] and ds.coco.anns[12]["bbox"] == [0, 0, 6, 6]
    assert ds.coco.anns[15]["iscrowd"] == 1 and ds.coco.anns[12]["iscrowd"] == 0
    assert ds.coco.anns[12]["area"] == 36  # no area in the file: the (clipped) box's


def test_load_coco_keep_crowd_and_no_warning_when_clean(tmp_path):
    ann = _coco(tmp_path, annotations=[
        {"id": 1, "image_id": 2, "category_id": 90, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5.5, 5], "iscrowd": 0},
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = R.load_coco(ann, tmp_path / "images", keep_crowd=True)
    b = next(im for im in ds.images if im.id == 2)
    np.testing.assert_array_equal(b.ann_ids, [1, 2])
    np.testing.assert_allclose(b.boxes[1], [2, 2, 5.5, 5])



def test_load_coco_evaluation_area_from_the_mask_when_the_file_has_none(tmp_path):
    """COCOeval needs an 'area' (small / medium / large) and 'iscrowd' on every ground-truth object."""
    ann = _coco(tmp_path, annotations=[
        {"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 7, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 30, 20, 20], "area": 300, "iscrowd": 0},  # clipped
    ])
    with pytest.warns(DataWarning, match="clipped 1 boxes"):
        ds = R.load_coco(ann, tmp_path / "images")
    assert [ds.coco.anns[i]["area"] for i in (1, 2, 3)] == [16, 7, 100]
    assert [ds.coco.anns[i]["iscrowd"] for i in (1, 2, 3)] == [0, 0, 0]

@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"images": [], "annotations": []}), "has no 'categories'"),
    (json.dumps({"images": {}, "annotations": [], "categories": [{"id": 1, "name": "a"}]}), "'images' must be a list"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 5}], "annotations": [],
                 "categories": [{"id": 1, "name": "a"}]}), r"images\[0\] has no 'width'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 5, "height": 5}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
                 "categories": [{"id": 1, "name": "a"}]}), "unknown category id 3"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 5, "height": 5}],
                 "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                 "categories": [{"id": 1, "name": "a"}]}), "unknown image id 4"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 5, "height": 5}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}],
                 "categories": [{"id": 1, "name": "a"}]}), "bbox must be 4 numbers"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 5, "height": 5}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
                 "categories": [{"id": 1, "name": "a"}]}), r"annotations\[0\] has no 'bbox'"),
])
def test_load_coco_malformed_files_name_the_file_and_the_problem(tmp_path, content, message):
    ann = tmp_path / "broken_instances.json"
    ann.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        R.load_coco(ann, tmp_path, check_images=False)
    assert "broken_instances.json" in str(err.value)


def test_load_coco_missing_files(tmp_path):
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        R.load_coco(tmp_path / "nope.json", tmp_path)
    ann = _coco(tmp_path, make_files=False)
    _save(tmp_path / "images" / "a.jpg", _rgb(50, 100))
    with pytest.raises(DataError, match=r"2 of 3 images .* missing .*sub/b\.jpg"):
        R.load_coco(ann, tmp_path / "images")
    with pytest.warns(DataWarning):
        ds = R.load_coco(ann, tmp_path / "images", check_images=False)
    assert len(ds) == 3


def test_load_coco_on_the_embedded_dataset(tiny_embedded):
    ds = R.load_coco(tiny_embedded / "annotations" / "instances_train.json", tiny_embedded / "images" / "train")
    assert ds.class_names == list(CLASSES) and ds.category_ids == list(range(1, 11))
    assert len(ds.images) == 12 and sum(len(im.boxes) for im in ds.images) > 0
    im = next(im for im in ds.images if len(im.ann_ids))
    mask = ds.coco.annToMask(ds.coco.anns[int(im.ann_ids[0])])
    ys, xs = np.nonzero(mask)
    np.testing.assert_array_equal(im.boxes[0], [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1])
    assert R.read_image(im.path).shape == (im.height, im.width, 3)


# ----------------------------------------------------------------------------------- segmentation
def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for k, stem in enumerate(["2007_000032", "2007_000039"]):
        _save(voc / "JPEGImages" / f"{stem}.jpg", _rgb(24, 32, k))
        label = np.zeros((24, 32), np.uint8)
        label[4:12, 4:20] = 15
        label[12, :] = 255
        _save(voc / "SegmentationClass" / f"{stem}.png", label, palette=True)
    split = voc / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "train.txt").write_text("2007_000032\n")
    (split / "val.txt").write_text("2007_000039\n")
    return voc


def test_voc_layout(tmp_path):
    voc = _voc(tmp_path)
    pairs = SR.find_segmentation_pairs(tmp_path, "train")
    assert pairs == [(voc / "JPEGImages" / "2007_000032.jpg", voc / "SegmentationClass" / "2007_000032.png")]
    ds = SR.SegmentationFolder.from_root(tmp_path, "val")
    assert len(ds) == 1 and ds.class_names == SR.VOC_CLASSES and len(ds.class_names) == 21
    image, label = ds[0]
    assert image.shape == (24, 32, 3) and label.dtype == np.uint8
    assert Image.open(ds.pairs[0][1]).mode == "P"
    assert set(np.unique(label)) == {0, 15, 255} and (label[4:12, 4:20] == 15).all()
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\nmissing_one\n")
    with pytest.raises(DataError, match="missing_one.jpg"):
        SR.find_segmentation_pairs(tmp_path, "train")
    with pytest.raises(DataError, match="test.txt"):
        SR.find_segmentation_pairs(tmp_path, "test")


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    city = "aachen"
    stem = f"{city}_000000_000019"
    _save(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", _rgb(8, 16))
    ids = np.zeros((8, 16), np.uint8)
    ids[0, :4] = [7, 26, 33, 1]  # road, car, bicycle, ego vehicle
    ids[1, :3] = [23, 24, 29]  # sky, person, caravan (not evaluated)
    _save(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", ids)
    _save(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_color.png", _rgb(8, 16))  # ignored
    ds = SR.SegmentationFolder.from_root(tmp_path, "train")
    assert len(ds) == 1 and len(ds.class_names) == 19 and ds.class_names[13] == "car"
    _, label = ds[0]
    assert label[0, :4].tolist() == [0, 13, 18, 255]
    assert label[1, :3].tolist() == [10, 11, 255]
    assert (label[2:] == 255).all()  # labelId 0 (unlabeled) -> ignore
    (tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=f"{stem}_leftImg8bit.png.*{stem}_gtFine_labelIds.png"):
        SR.find_segmentation_pairs(tmp_path, "train")


def test_project_layout_on_the_embedded_dataset(tiny_embedded):
    ds = SR.SegmentationFolder.from_root(tiny_embedded, "train")
    assert len(ds) == 12 and ds.class_names == ["background", *CLASSES]
    image, label = ds[0]
    assert image.shape[:2] == label.shape and set(np.unique(label)) <= set(range(11)) | {255}
    assert SR.segmentation_layout(tiny_embedded) == "project"



def test_segmentation_class_names_name_the_broken_file(tiny_embedded, tmp_path):
    """Issue #14: a truncated instances_*.json is reported as itself, not as "cannot tell the classes"."""
    import shutil

    root = tmp_path / "seg"
    shutil.copytree(tiny_embedded, root)
    assert SR.segmentation_class_names(root) == ["background", *CLASSES]
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text()[:300])
    with pytest.raises(DataError, match=r"instances_train\.json: not valid JSON .*classes\.txt"):
        SR.segmentation_class_names(root)
    with pytest.raises(DataError, match=r"instances_train\.json: not valid JSON"):
        SR.SegmentationFolder.from_root(root, "val")
    ann.write_text(json.dumps({"categories": [{"name": "cat"}]}))
    with pytest.raises(DataError, match=r"instances_train\.json: cannot read its categories \(KeyError"):
        SR.segmentation_class_names(root)
    (root / "classes.txt").write_text("background\ncat\n")  # classes.txt wins: the JSON is not read
    assert SR.segmentation_class_names(root) == ["background", "cat"]
    (root / "classes.txt").unlink()
    shutil.rmtree(root / "annotations")
    assert SR.segmentation_class_names(root) is None  # nothing tells: the caller decides (model.num_classes)
    assert SR.SegmentationFolder.from_root(root, "val").class_names is None

def test_segmentation_folder_errors_name_both_files(tmp_path):
    _save(tmp_path / "img" / "x.jpg", _rgb(20, 30))
    _save(tmp_path / "lbl" / "x.png", np.zeros((20, 31), np.uint8))
    with pytest.raises(DataError, match=r"mask .*lbl/x\.png is 31x20 but its image .*img/x\.jpg is 30x20"):
        SR.SegmentationFolder(tmp_path / "img", tmp_path / "lbl")
    _save(tmp_path / "img" / "y.jpg", _rgb(20, 30))
    (tmp_path / "lbl" / "x.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image .*img/x\.jpg: expected .*lbl/x\.png"):
        SR.SegmentationFolder(tmp_path / "img", tmp_path / "lbl")
    _save(tmp_path / "rgbmask" / "a.png", _rgb(4, 4))
    with pytest.raises(DataError, match="single-channel"):
        R.read_label(tmp_path / "rgbmask" / "a.png")
    with pytest.raises(DataError, match="not a segmentation dataset.*JPEGImages.*leftImg8bit.*masks"):
        SR.segmentation_layout(tmp_path)


# ------------------------------------------------------------------------------------ ImageFolder
def test_image_folder_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        R.image_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        R.image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        R.image_folder(tmp_path / "noimg")
    _save(tmp_path / "ok" / "cat" / "1.png", _rgb(8, 8))
    _save(tmp_path / "ok" / "dog" / "2.png", _rgb(8, 8))
    (tmp_path / "ok" / "dog" / "3.jpg").write_bytes(b"corrupt")
    ds = R.image_folder(tmp_path / "ok")
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    img, target = ds[0]
    assert img.size == (8, 8) and target == 0
    with pytest.raises(DataError, match="3.jpg"):
        ds[2]


# ----------------------------------------------------------------------------------------- layout
def test_resolve_project_coco_yaml_and_unknown_layouts(tiny_embedded, tmp_path):
    p = resolve_dataset(tiny_embedded)
    assert p.train_ann == tiny_embedded / "annotations" / "instances_train.json"
    assert p.val_images == tiny_embedded / "images" / "val" and p.train_masks == tiny_embedded / "masks" / "train"

    coco = tmp_path / "coco"
    for d in ("train2017", "val2017", "annotations"):
        (coco / d).mkdir(parents=True)
    for s in ("train", "val"):
        (coco / "annotations" / f"instances_{s}2017.json").write_text("{}")
    p = resolve_dataset(coco)
    assert p.train_images == coco / "train2017" and p.val_ann.name == "instances_val2017.json"
    assert p.train_masks is None and p.val_masks is None

    spec = tmp_path / "data.yaml"
    spec.write_text("train_images: coco/train2017\nval_images: coco/val2017\n"
                    "train_ann: coco/annotations/instances_train2017.json\n"
                    "val_ann: coco/annotations/instances_val2017.json\n")
    p = resolve_dataset(spec)
    assert p.train_images == coco / "train2017" and p.val_masks is None
    spec.write_text("train_images: coco/train2017\nval_imgs: x\n")
    with pytest.raises(UserError, match=r"missing keys \['val_images', 'train_ann', 'val_ann'\].*unknown keys \['val_imgs'\]"):
        resolve_dataset(spec)

    odd = tmp_path / "odd"
    (odd / "pictures").mkdir(parents=True)
    (odd / "labels.csv").write_text("")
    with pytest.raises(UserError, match=r"images/train.*train2017.*found: labels\.csv, pictures/"):
        resolve_dataset(odd)
    with pytest.raises(UserError, match="not found"):
        resolve_dataset(tmp_path / "absent")


def test_resolve_train_only_datasets_for_pretraining(tiny_embedded, tmp_path):
    """Issue #14: montage / FCMAE read only the train split; a dataset without val is theirs to use."""
    import shutil

    proj = tmp_path / "proj"
    (proj / "images").mkdir(parents=True)
    (proj / "annotations").mkdir()
    shutil.copytree(tiny_embedded / "images" / "train", proj / "images" / "train")
    shutil.copy(tiny_embedded / "annotations" / "instances_train.json", proj / "annotations")
    with pytest.raises(UserError, match="not a dataset folder I know"):
        resolve_dataset(proj)  # fine-tuning still needs its val split
    p = resolve_dataset(proj, need_val=False)
    assert p.train_images == proj / "images" / "train" and p.val_images is None and p.val_ann is None
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    p = resolve_dataset(coco, need_val=False)
    assert p.train_ann.name == "instances_train2017.json" and p.val_images is None and p.train_masks is None
    spec = tmp_path / "train_only.yaml"
    spec.write_text("train_images: proj/images/train\ntrain_ann: proj/annotations/instances_train.json\n")
    with pytest.raises(UserError, match=r"missing keys \['val_images', 'val_ann'\]"):
        resolve_dataset(spec)
    p = resolve_dataset(spec, need_val=False)
    assert p.train_images == proj / "images" / "train" and p.val_ann is None
    with pytest.raises(UserError, match="the val split is optional here"):
        resolve_dataset(tmp_path / "coco" / "train2017", need_val=False)


def test_resolve_none_builds_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.setattr(common.paths, "DEFAULT_DATA_DIR", tmp_path / "embedded")
    p = resolve_dataset(None, embedded_size=3, seed=2)
    assert p.root == tmp_path / "embedded" and p.train_ann.is_file() and p.val_masks.is_dir()
    assert len(json.loads(p.train_ann.read_text())["images"]) == 3
