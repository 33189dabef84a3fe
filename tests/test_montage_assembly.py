"""Montage assembly (datamodules/montage_assembler.py, datamodules/montage.py): layout rules, the no-warp
property checked against an independent computation from the source image, zero padding, short-group fallback, dataset
determinism and sharding, the typed uint8 batch and the (on-device) normalisation, the DataModule and
previews."""

from __future__ import annotations

import json
import logging
import pickle
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _normalize_affine,
    denormalize,
    normalize_images,
    normalize_uint8,
)
from datamodules.montage import (
    MontageBatch,
    MontageDataModule,
    MontageDataset,
    MontageSampler,
    collate_montages,
    write_preview,
)
from datamodules.montage_assembler import CELL_KEYS, ERF_STREAM, MontageAssembler, _fit_axis
from datamodules.sample_bank import SampleBank
from models.montage_canvas import POSITION_GROUPS, POSITIONS, MontageLayout
from tests.test_sample_bank import build, load, montage_datamodule, write_coco

LAYOUT = MontageLayout((224, 224), (0.4, 0.4))


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_m")
    ann, imgs = write_coco(root, n_images=12, boxes_per_image=8, seed=1, box_side=(15, 160))
    return ann, imgs, load(ann, imgs)


@pytest.fixture(scope="module")
def bank(coco_set, tmp_path_factory):
    return build(coco_set[2], tmp_path_factory.mktemp("bank_m") / "b", max_side=10_000)


@pytest.fixture(scope="module")
def capped_bank(coco_set, tmp_path_factory):
    return build(coco_set[2], tmp_path_factory.mktemp("bank_c") / "b", max_side=48)


def source_pixels(coco, image_id: int) -> np.ndarray:
    """The source image re-read with PIL (not the code under test's reader)."""
    path = next(im.path for im in coco.images if im.id == image_id)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cell_pixels(canvas: np.ndarray, cell: dict) -> np.ndarray:
    x, y, w, h = cell["cell_box"]
    return canvas[y : y + h, x : x + w]


def full_reference(coco, cell) -> np.ndarray:
    """Independent: crop source_box from the source image, resize the whole of it by ``scale``
    (cv2 bilinear, sizes rounded to whole pixels), flip, then cut the window ``crop_in_scaled``."""
    src = source_pixels(coco, cell["image_id"])
    x, y, w, h = cell["source_box"]
    ws, hs = max(1, round(w * cell["scale"])), max(1, round(h * cell["scale"]))
    assert [ws, hs] == cell.extra["scaled_size"]
    full = cv2.resize(src[y : y + h, x : x + w], (ws, hs), interpolation=cv2.INTER_LINEAR)
    if cell["flip"]:
        full = full[:, ::-1]
    X, Y, W, H = cell.extra["crop_in_scaled"]
    assert X >= 0 and ws >= X + W and Y >= 0 and hs >= Y + H
    return full[Y : Y + H, X : X + W]


# ------------------------------------------------------------------------------------------------
# layout and metadata
# ------------------------------------------------------------------------------------------------


def test_cells_follow_the_layout(bank):
    asm = MontageAssembler(bank, LAYOUT)
    preset = LAYOUT.cell_boxes()
    rng = np.random.default_rng(0)
    for _ in range(60):
        canvas, cells = asm.assemble(rng)
        assert canvas.shape == (224, 224, 3) and canvas.dtype == np.uint8
        assert [c["position"] for c in cells] == list(POSITIONS)
        for c in cells:
            assert tuple(c.keys()) == CELL_KEYS
            assert c["group"] == POSITION_GROUPS[c["position"]]  # every group is populated here
            i = c.extra["index"]
            assert bank.groups[i] == c["group"]
            assert c["label"] == int(bank.labels[i]) and c["image_id"] == int(bank.image_ids[i])
            assert c["source_box"] == bank.source_boxes[i].tolist()
            assert c["category_id"] == (None if c["label"] == bank.background_label else int(bank.category_ids[i]))
            assert 0.8 <= c["scale"] <= 1.5 and isinstance(c["flip"], bool)
            # content lies in its preset cell and has the size min(scaled sample, cell) per axis
            px, py, pw, ph = preset[c["position"]]
            x, y, w, h = c["cell_box"]
            assert px <= x and py <= y and x + w <= px + pw and y + h <= py + ph
            ws, hs = c.extra["scaled_size"]
            assert (w, h) == (min(ws, pw), min(hs, ph))
            assert c.extra["preset_cell"] == [px, py, pw, ph]
        # the smaller-area S sample (area of the rescaled sample) is top-left
        tl, br = cells[0], cells[3]
        area = [round(c["source_box"][2] * c["scale"]) * round(c["source_box"][3] * c["scale"]) for c in (tl, br)]
        assert area[0] <= area[1]
        json.dumps(cells)  # the metadata is plain JSON


def test_aspect_groups_land_in_their_cells(bank):
    asm = MontageAssembler(bank, LAYOUT)
    rng = np.random.default_rng(1)
    for _ in range(30):
        _, cells = asm.assemble(rng)
        for c in cells:
            w, h = c["source_box"][2:]
            r = w / h
            assert {"top_left": 0.5 <= r <= 1.5, "bottom_right": 0.5 <= r <= 1.5,
                    "bottom_left": r < 0.5, "top_right": r > 1.5}[c["position"]]


# ------------------------------------------------------------------------------------------------
# no warping: pixels against an independent computation
# ------------------------------------------------------------------------------------------------


def test_scale_one_is_an_exact_crop_of_the_source(coco_set, bank):
    coco = coco_set[2]
    asm = MontageAssembler(bank, LAYOUT, scale_range=(1.0, 1.0), flip_p=0.5)
    rng = np.random.default_rng(2)
    flips = set()
    for _ in range(25):
        canvas, cells = asm.assemble(rng)
        for c in cells:
            flips.add(c["flip"])
            src = source_pixels(coco, c["image_id"])
            x, y, w, h = c["source_box"]
            sample = src[y : y + h, x : x + w]
            if c["flip"]:
                sample = sample[:, ::-1]
            X, Y, W, H = c.extra["crop_in_scaled"]
            np.testing.assert_array_equal(cell_pixels(canvas, c), sample[Y : Y + H, X : X + W])
    assert flips == {True, False}


def test_cells_are_the_rescaled_source_region(coco_set, bank):
    """Any scale, uncapped crops: the cell is exactly the recorded source region resized (cv2 bilinear)
    to the cell content's size, flipped; the realised factor is ``scale`` up to whole-pixel rounding,
    the same on both axes (no warp)."""
    coco = coco_set[2]
    asm = MontageAssembler(bank, LAYOUT)
    rng = np.random.default_rng(3)
    kinds = set()
    for _ in range(30):
        canvas, cells = asm.assemble(rng)
        for c in cells:
            src = source_pixels(coco, c["image_id"])
            x, y, w, h = c["source_box"]
            rx, ry, rw, rh = c.extra["crop_in_source"]
            assert rx >= 0 and rx + rw <= w and ry >= 0 and ry + rh <= h
            region = src[y + ry : y + ry + rh, x + rx : x + rx + rw]
            cw, ch = c["cell_box"][2:]
            expect = cv2.resize(region, (cw, ch), interpolation=cv2.INTER_LINEAR)
            if c["flip"]:
                expect = expect[:, ::-1]
            np.testing.assert_array_equal(cell_pixels(canvas, c), expect)
            sx, sy = cw / rw, ch / rh
            assert abs(sx / c["scale"] - 1) <= 0.5 / rw + 0.5 / w + 1e-9
            assert abs(sy / c["scale"] - 1) <= 0.5 / rh + 0.5 / h + 1e-9
            kinds.add("crop" if (cw, ch) != tuple(c.extra["scaled_size"]) else "pad")
    assert kinds == {"crop", "pad"}


def test_cells_match_resize_whole_then_crop(coco_set, bank):
    """Against the most literal reference (resize the whole sample, flip, crop): identical when the
    whole sample is visible; when it is cropped, only a sub-pixel phase differs (the window is cut
    on whole source pixels), so the mean difference stays small."""
    coco = coco_set[2]
    asm = MontageAssembler(bank, LAYOUT)
    rng = np.random.default_rng(4)
    errs = []
    for _ in range(30):
        canvas, cells = asm.assemble(rng)
        for c in cells:
            ref = full_reference(coco, c).astype(np.int16)
            got = cell_pixels(canvas, c).astype(np.int16)
            if c["cell_box"][2:] == c.extra["scaled_size"]:
                np.testing.assert_array_equal(got, ref)
            else:
                errs.append(np.abs(got - ref).mean())
    assert len(errs) > 10
    assert np.mean(errs) < 4 and np.max(errs) < 16


def test_capped_crops_match_within_tolerance(coco_set, capped_bank):
    coco = coco_set[2]
    asm = MontageAssembler(capped_bank, LAYOUT)
    rng = np.random.default_rng(5)
    errs, capped = [], 0
    for _ in range(30):
        canvas, cells = asm.assemble(rng)
        for c in cells:
            capped += capped_bank.stored_scale[c.extra["index"]] < 1
            ref = full_reference(coco, c).astype(np.int16)
            errs.append(np.abs(cell_pixels(canvas, c).astype(np.int16) - ref).mean())
    assert capped > 20
    # INTER_AREA down to 48 px then bilinear up loses detail, but the content is the same
    assert np.mean(errs) < 12


def test_padding_is_zero(bank):
    for pad in ("random", "center"):
        asm = MontageAssembler(bank, LAYOUT, pad=pad)
        rng = np.random.default_rng(6)
        padded = 0
        for _ in range(30):
            canvas, cells = asm.assemble(rng)
            covered = np.zeros(canvas.shape[:2], bool)
            for c in cells:
                x, y, w, h = c["cell_box"]
                covered[y : y + h, x : x + w] = True
                px, py, pw, ph = c.extra["preset_cell"]
                ox, oy = c.extra["pad_offset"]
                assert (x - px, y - py) == (ox, oy)
                if pad == "center":
                    assert (ox, oy) == ((pw - w) // 2, (ph - h) // 2)
            assert (canvas[~covered] == 0).all()
            padded += int((~covered).sum() > 0)
        assert padded > 10


def test_reused_output_buffer_gives_the_same_montage(bank):
    asm = MontageAssembler(bank, LAYOUT)
    a, cells_a = asm.assemble(np.random.default_rng(7))
    buf = np.full((224, 224, 3), 255, np.uint8)
    b, cells_b = asm.assemble(np.random.default_rng(7), out=buf)
    assert b is buf
    np.testing.assert_array_equal(a, b)
    assert cells_a == cells_b


# ------------------------------------------------------------------------------------------------
# short groups and empty banks
# ------------------------------------------------------------------------------------------------


def test_short_group_falls_back_and_logs_once(tmp_path, caplog):
    ann, imgs = write_coco(tmp_path, n_images=6, boxes_per_image=5, aspects=(1.0, 1.2))  # S only
    bank = build(load(ann, imgs), tmp_path / "bank", max_side=10_000)
    assert set(bank.groups) <= {"S", "W"} and "T" not in set(bank.groups)
    with caplog.at_level(logging.WARNING, logger="datamodules.montage_assembler"):
        asm = MontageAssembler(bank, LAYOUT)
        MontageAssembler(bank, LAYOUT)  # a second assembler on the same bank says nothing new
        rng = np.random.default_rng(8)
        for _ in range(20):
            canvas, cells = asm.assemble(rng)
            bl = cells[2]
            assert bl["position"] == "bottom_left" and bl["group"] in ("S", "W")
            assert bl.extra["requested_group"] == "T"
            px, py, pw, ph = LAYOUT.cell_boxes()["bottom_left"]
            x, y, w, h = bl["cell_box"]
            assert px <= x and x + w <= px + pw and py <= y and y + h <= py + ph
    t_msgs = [r for r in caplog.records if "no T samples" in r.getMessage()]
    assert len(t_msgs) == 1
    assert "T cells use S samples" in t_msgs[0].getMessage()  # nearest group first


def test_missing_square_group_uses_wide_then_tall(tmp_path):
    ann, imgs = write_coco(tmp_path, n_images=4, boxes_per_image=6, aspects=(0.2, 4.0), box_side=(30, 60))
    bank = build(load(ann, imgs), tmp_path / "bank", max_side=10_000)
    assert "S" not in set(bank.groups)
    asm = MontageAssembler(bank, LAYOUT)
    assert asm.source_group == {"S": "W", "T": "T", "W": "W"}
    _, cells = asm.assemble(np.random.default_rng(0))
    assert [c["group"] for c in cells] == ["W", "W", "T", "W"]


def test_empty_bank_is_a_clear_error(tmp_path):
    ann, imgs = write_coco(tmp_path, n_images=2, boxes_per_image=0)
    bank = build(load(ann, imgs), tmp_path / "bank")
    with pytest.raises(UserError, match="empty"):
        MontageAssembler(bank, LAYOUT)


# ------------------------------------------------------------------------------------------------
# dataset, sampler, batch
# ------------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_rank_dependent(bank):
    asm = MontageAssembler(bank, LAYOUT)
    ds = MontageDataset(asm, epoch_size=10, seed=3)
    a, b = ds[5], MontageDataset(asm, epoch_size=10, seed=3)[5]
    assert torch.equal(a.image, b.image) and a.labels == b.labels
    assert not torch.equal(a.image, ds[6].image)
    assert not torch.equal(a.image, MontageDataset(asm, 10, seed=4)[5].image)
    assert not torch.equal(a.image, MontageDataset(asm, 10, seed=3, rank=1)[5].image)
    assert a.image.shape == (224, 224, 3) and a.image.dtype == torch.uint8
    assert len(a.labels) == 4 and len(a.cell_boxes) == 4 and a.index == 5
    canvas, cells = ds.montage(5)  # the metadata path draws the same montage as the training path
    assert torch.equal(a.image, torch.from_numpy(canvas))
    assert list(a.labels) == [c["label"] for c in cells]
    assert list(a.cell_boxes) == [c["cell_box"] for c in cells]


def test_batched_fetch_matches_single_items(bank):
    ds = MontageDataset(MontageAssembler(bank, LAYOUT), epoch_size=8, seed=2)
    singles = [ds[i] for i in (3, 1, 7)]
    batch = ds.__getitems__([3, 1, 7])
    for a, b in zip(singles, batch):
        assert torch.equal(a.image, b.image) and a.labels == b.labels
        assert a.cell_boxes == b.cell_boxes and a.index == b.index
    collated = collate_montages(batch)
    ds.__getitems__([0, 2])  # reuses the buffer: the collated batch must not change
    torch.testing.assert_close(collated.images, collate_montages(singles).images, rtol=0, atol=0)
    assert pickle.loads(pickle.dumps(ds))._buffer is None



def test_fit_axis_offsets_cover_every_position_and_never_overflow():
    """The uniform u in [0, 1) maps onto every admissible offset, the extremes included (u = 0 and the
    largest double below 1), for the random pad and the crop; the centre pad ignores u."""
    below_one = np.nextafter(1.0, 0.0)
    for scaled, stored, cell in [(5, 5, 9), (30, 20, 17), (3, 3, 3), (100, 80, 7)]:
        offsets = {_fit_axis(scaled, stored, cell, "random", u) for u in np.linspace(0, below_one, 2001)}
        if scaled <= cell:  # pad: (0, stored, scaled, off) with off in [0, cell - scaled]
            assert {o[3] for o in offsets} == set(range(cell - scaled + 1))
            assert {o[:3] for o in offsets} == {(0, stored, scaled)}
            assert _fit_axis(scaled, stored, cell, "center", below_one)[3] == (cell - scaled) // 2
        else:  # crop: m stored pixels survive, start p in [0, stored - m]
            m = min(stored, max(1, round(cell * stored / scaled)))
            assert {o[0] for o in offsets} == set(range(stored - m + 1))
            assert {o[1:] for o in offsets} == {(m, cell, 0)}

def test_sampler_shards_ranks_and_moves_on_each_epoch(bank):
    ds = MontageDataset(MontageAssembler(bank, LAYOUT), epoch_size=10)
    r0, r1 = MontageSampler(ds, num_replicas=2, rank=0), MontageSampler(ds, num_replicas=2, rank=1)
    e0 = [list(r0), list(r1)]
    assert not set(e0[0]) & set(e0[1]) and len(e0[0]) == len(e0[1]) == 5
    r0.set_epoch(1)
    r1.set_epoch(1)
    e1 = [list(r0), list(r1)]
    assert not (set(e1[0]) | set(e1[1])) & (set(e0[0]) | set(e0[1]))
    assert sorted(e1[0] + e1[1]) == list(range(10, 20))
    single = MontageSampler(ds)
    assert list(single) == list(range(10))



def test_sampler_skips_the_trained_part_of_a_resumed_epoch_only(bank):
    """A resume mid-epoch skips what was trained on, once; a resume after the epoch's last batch (skip of a
    whole epoch) starts the next epoch from its beginning instead of leaving it empty."""
    ds = MontageDataset(MontageAssembler(bank, LAYOUT), epoch_size=10)
    mid = MontageSampler(ds, num_replicas=2, rank=1, skip=2)
    mid.set_epoch(3)
    assert list(mid) == [31 + 2 * k for k in range(2, 5)]  # rank 1 of epoch 3: 31, 33, ...; first two skipped
    assert list(mid) == [31 + 2 * k for k in range(5)]  # the next pass is whole again
    for whole_epoch in (5, 6):  # this rank's shard holds 5 indices
        after_last = MontageSampler(ds, num_replicas=2, rank=1, skip=whole_epoch)
        after_last.set_epoch(1)
        assert list(after_last) == [11 + 2 * k for k in range(5)]

def test_collate_builds_a_uint8_typed_batch(bank):
    ds = MontageDataset(MontageAssembler(bank, LAYOUT), epoch_size=8, seed=0)
    items = [ds[i] for i in range(5)]
    batch = collate_montages(items)
    assert isinstance(batch, MontageBatch) and len(batch) == 5
    # uint8, channels-first shape over channels-last memory (the canvases copied as they are)
    assert batch.images.shape == (5, 3, 224, 224) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.images, torch.stack([it.image for it in items]).permute(0, 3, 1, 2))
    assert batch.labels.shape == (5, 4) and batch.labels.dtype == torch.long
    assert batch.cell_boxes.shape == (5, 4, 4) and batch.cell_boxes.dtype == torch.long
    assert batch.index.tolist() == [0, 1, 2, 3, 4] and batch.index.dtype == torch.long
    moved = batch.to("cpu")
    assert isinstance(moved, MontageBatch) and torch.equal(moved.labels, batch.labels)
    assert torch.equal(moved.images, batch.images)
    if torch.cuda.is_available():
        pinned = batch.pin_memory().images
        assert pinned.is_pinned() and torch.equal(pinned, batch.images)
    with pytest.raises(ValueError):
        collate_montages([items[0]._replace(image=torch.zeros(224, 224, 3))])


def _direct_normalisation(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (images.cpu().double() / 255 - mean) / std


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_normalize_images_equals_the_direct_computation(bank, device):
    """The on-device normalisation (``normalize_images``) == (x / 255 - mean) / std, for every uint8 value,
    from either input layout, in the requested memory format; ``denormalize`` inverts it exactly."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ds = MontageDataset(MontageAssembler(bank, LAYOUT), epoch_size=8, seed=0)
    montages = collate_montages([ds[i] for i in range(3)]).images  # channels-last uint8
    ramp = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)  # every value, per channel
    for raw in (montages, montages.contiguous(), ramp):
        x = raw.to(device)
        for channels_last in (False, True):
            y = normalize_images(x, channels_last=channels_last)
            assert y.dtype == torch.float32 and y.device == x.device and y.shape == raw.shape
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert y.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(y.cpu().double(), _direct_normalisation(raw), atol=1e-6, rtol=0)
            assert np.array_equal(denormalize(y), raw.permute(0, 2, 3, 1).numpy())
            if device == "cpu":  # the accelerator arithmetic, run on the CPU (no GPU needed to check it)
                z = _normalize_affine(x, channels_last)
                assert z.dtype == torch.float32 and z.is_contiguous(memory_format=fmt)
                torch.testing.assert_close(z.double(), _direct_normalisation(raw), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        normalize_images(montages.float())
    with pytest.raises(ValueError):
        normalize_images(montages.permute(0, 2, 3, 1))  # (B, H, W, 3): not the batch layout
    with pytest.raises(ValueError):
        normalize_uint8([np.zeros((4, 4, 3), np.float32)])


# ------------------------------------------------------------------------------------------------
# DataModule and previews
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def datamodule(coco_set, tmp_path, monkeypatch):
    ann, imgs, _ = coco_set
    paths = SimpleNamespace(root=tmp_path, train_ann=ann, train_images=imgs)
    monkeypatch.setattr(MontageDataModule, "_paths", lambda self: paths)
    return montage_datamodule("data.batch_size=4", "data.num_workers=0", "data.canvas=160", "seed=0",
                              "data.pin_memory=false", f"data.cache_dir={tmp_path / 'cache'}")


def test_datamodule_builds_once_and_serves_batches(datamodule, tmp_path):
    dm = datamodule
    dm.prepare_data()
    bank_dirs = list((tmp_path / "cache" / "sample_bank").iterdir())
    assert len(bank_dirs) == 1 and (bank_dirs[0] / "bank_info.json").is_file()
    stamp = (bank_dirs[0] / "crops.u8").stat().st_mtime_ns
    dm.prepare_data()  # cached: nothing rebuilt
    assert (bank_dirs[0] / "crops.u8").stat().st_mtime_ns == stamp
    assert json.loads((bank_dirs[0] / "bank_info.json").read_text())["settings"]["max_side"] == 320
    dm.setup("fit")
    assert dm.num_classes == 4 and dm.class_names[-1] == "background"
    assert dm.layout.canvas == (160, 160) and isinstance(dm.bank, SampleBank)
    assert len(dm.train_dataset) == len(dm.bank) // 4
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert isinstance(batch, MontageBatch) and batch.images.shape == (4, 3, 160, 160)
    assert batch.images.dtype == torch.uint8  # the loader emits uint8; normalised on the device
    assert batch.index.tolist() == [0, 1, 2, 3]
    assert ((batch.labels >= 0) & (batch.labels < dm.num_classes)).all()
    erf = dm.erf_images(2)  # normalised float, contiguous (B, 3, H, W)
    assert erf.shape == (2, 3, 160, 160) and erf.dtype == torch.float32 and erf.is_contiguous()
    torch.testing.assert_close(erf, dm.erf_images(2))
    erf_set = MontageDataset(dm.assembler, 2, seed=dm.seed, rank=ERF_STREAM)
    raw = torch.stack([erf_set[k].image for k in range(2)]).permute(0, 3, 1, 2)
    torch.testing.assert_close(erf.double(), _direct_normalisation(raw), atol=1e-6, rtol=0)


def test_workers_give_the_same_batches(datamodule):
    dm = datamodule
    dm.prepare_data()
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    dm.num_workers = 1
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    again = next(iter(loader))
    assert again.images.dtype == torch.uint8  # through a worker process (shared memory), strides kept
    assert again.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_constructor_reads_the_data_section():
    dm = montage_datamodule("seed=3", "data.root=/x", "data.batch_size=8", "data.canvas=96", "data.split=[0.5,0.4]",
                            "data.scale_range=[0.9,1.1]", "data.neg_ratio=0.2", "data.max_side=200")
    assert (dm.data_root, dm.batch_size, dm.seed, dm.max_side, dm.neg_ratio) == ("/x", 8, 3, 200, 0.2)
    assert dm.layout == MontageLayout((96, 96), (0.5, 0.4)) and dm.scale_range == (0.9, 1.1)
    assert montage_datamodule("data.canvas=96", "data.max_side=null").max_side == 192  # default: 2x the canvas


def test_write_preview(datamodule, tmp_path, bank):
    out = tmp_path / "preview"
    paths = write_preview(datamodule, out, n=3, seed=0)
    assert [p.name for p in paths] == ["montage_0000.png", "montage_0001.png", "montage_0002.png"]
    for k, p in enumerate(paths):
        canvas, cells = datamodule.train_dataset.montage(k)  # preview k = training item k (rank 0)
        png = np.asarray(Image.open(p).convert("RGB"))
        np.testing.assert_array_equal(png, canvas)  # lossless and un-normalised
        meta = json.loads((out / f"montage_{k:04d}.json").read_text())
        assert meta == {"canvas": [160, 160], "cells": [{key: c[key] for key in CELL_KEYS} for c in cells]}
        assert all(tuple(c) == CELL_KEYS for c in meta["cells"])
        ann = np.asarray(Image.open(out / f"montage_{k:04d}_annotated.png"))
        assert ann.shape == (320, 320, 3) and not np.array_equal(ann[::2, ::2], canvas)
    # an assembler works as well
    more = write_preview(MontageAssembler(bank, LAYOUT), tmp_path / "p2", n=1, seed=1)
    assert np.asarray(Image.open(more[0])).shape == (224, 224, 3)


def test_datamodule_on_the_embedded_layout_writes_nothing_into_the_dataset(tiny_embedded, tmp_path, private_cache):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_embedded, root)
    files_before = sorted(p.relative_to(root) for p in root.rglob("*"))
    small = ("data.batch_size=2", "data.num_workers=0", "data.canvas=96", "data.pin_memory=false")
    dm = montage_datamodule(f"data.root={root}", *small)
    dm.prepare_data()
    dm.setup("fit")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files_before  # issue #14 case 5
    assert dm.bank.directory.parent == private_cache / "sample_bank"  # $CHEAPLUNCH_CACHE (conftest)
    other = montage_datamodule(f"data.root={root}", *small, f"data.cache_dir={tmp_path / 'mine'}")
    assert other.bank_path().parent == tmp_path / "mine" / "sample_bank"
    assert dm.bank.info["settings"]["ann_file"] == str((root / "annotations" / "instances_train.json").resolve())
    assert dm.num_classes == len(dm.class_names) and dm.class_names[-1] == "background"
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (2, 3, 96, 96)


def test_lightning_epochs_see_new_montages_with_persistent_workers(datamodule):
    """Lightning calls MontageSampler.set_epoch; the indices (and so the montages) move on each epoch
    even though the worker processes persist."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []
            self.first_pixels: list[torch.Tensor] = []

        def training_step(self, batch: MontageBatch, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch.index.tolist())
            self.first_pixels.append(batch.images[0, :, :8, :8].clone())
            return (self.w * batch.images.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = datamodule
    dm.num_workers = 1
    dm.epoch_size = 4
    model = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.seen == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not torch.equal(model.first_pixels[0], model.first_pixels[1])
