"""Sample bank: the classification "samples" montage pre-training is built from (Zhou et al., ECCV 2020,
Sec. 3.1), cut once from a COCO-format detection set and cached as decoded uint8 crops.

What is in the bank
-------------------
Positives: every ground-truth box (the boxes of the given ``CocoDataset``; crowd boxes only if it was
loaded with ``keep_crowd=True``) with its top-left and bottom-right corners moved *outward* by random
amounts, ``dx1, dx2 ~ U[0, w/2]`` and ``dy1, dy2 ~ U[0, h/2]``, so width and height grow by up to 2x,
then clipped to the image. Crops are whole pixels: the expansion is applied to the box's integer hull
(``floor(x) .. ceil(x + w)``) with the amounts floored to whole pixels, so the stored box always
contains the original box and each side is at most ``hull side + w`` (<= 2x the hull side). Label =
the contiguous class ``0..C-1``. Boxes narrower or shorter than ``min_box_side`` pixels (default 1)
are skipped and counted (``info["skipped_small_boxes"]``).

Negatives: label = background = ``C``. ``neg_ratio`` negatives per positive (default 0.1, i.e. the
paper's 10:1), spread over the images in proportion to their positives (a running quota, so the
overall ratio is exact up to rejections; a shortfall carries over to the next image). The paper gives
no size distribution; ours matches the positives': each candidate takes the (w, h) of a positive drawn
uniformly from the whole bank (its expanded, stored-in-source-pixels size) and a uniformly random
position where it fits the image. What a candidate must not overlap is ``negatives_avoid``:

- ``"expanded_positives"`` (default): the image's positives, i.e. the *expanded* boxes cut above (and
  the original GT boxes, which matters for boxes skipped as too small). Positives and negatives are then
  mutually exclusive sample sets, as the paper's sample selection describes them (Sec. 3.1: IoU = 0
  against every positive): no negative shows a positive's context margin, so no pixel is both
  labelled background and part of an object's sample.
- ``"boxes"``: only the original GT boxes. A negative may then show some of a positive's context
  margin, never any object pixel; more negatives fit on crowded images.

A candidate is accepted iff its intersection with each of those boxes is empty (IoU = 0; touching
edges allowed). Crowd regions (``iscrowd=1`` annotations in ``coco.coco``, when available) are avoided
in both settings, since they contain objects. Rejection sampling:
up to ``neg_max_tries`` (default 50) candidates per negative, drawn as one vectorised batch; if none
is valid the negative is given up and its quota passes to the next image (``info["negatives_short"]``
counts what was never placed). Because large candidates are rejected more often (they rarely fit
between objects), the accepted negatives are somewhat smaller than the positives on crowded images.

Aspect groups by stored-box w/h (in source pixels, before any downscale): S (square) if
``0.5 <= w/h <= 1.5`` (both bounds inclusive), T (tall) if ``< 0.5``, W (wide) if ``> 1.5``.

Storage (``out_dir``)
---------------------
- ``crops.u8``: every crop's HxWx3 uint8 RGB bytes, concatenated (read with ``np.memmap``).
- ``index.npz``: per sample ``offsets`` (bytes into crops.u8), ``shapes`` (stored h, w), ``labels``,
  ``groups`` (0=S, 1=T, 2=W), ``image_ids`` (COCO ids), ``category_ids`` (COCO id, -1 for background),
  ``ann_ids`` (the COCO annotation a positive was cut around, -1 for background),
  ``source_boxes`` (x, y, w, h of the expanded box in source-image pixels), ``stored_scale``
  (stored w / source w; < 1 only when the crop was capped).
- ``bank_info.json``: the settings the bank was built with (source annotation file with its size and
  mtime, a hash of the dataset's boxes, seed, ratio, max side, ...), class names, counts. The bank is
  rebuilt only when these settings change; it is written last, so a half-written bank never opens.

Crops whose longer side exceeds ``max_side`` are stored downscaled (OpenCV ``INTER_AREA``, aspect
kept) to keep the file small; ``stored_scale`` records the factor.

Determinism: all randomness comes from ``numpy.random.default_rng([seed, stream, image_id])`` and the
images are visited in COCO id order, so the same dataset and seed give an identical index and
identical bytes; each source image is decoded exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from common.errors import DataError, UserError
from datamodules.sample_plan import DEFAULT_NEGATIVES_AVOID, SamplePlan, check_negatives_avoid, plan_samples

if TYPE_CHECKING:
    from datamodules.readers import CocoDataset

log = logging.getLogger(__name__)

BANK_VERSION = 1
GROUPS: tuple[str, ...] = ("S", "T", "W")
GROUP_CODES: dict[str, int] = {g: i for i, g in enumerate(GROUPS)}
BACKGROUND_NAME = "background"
INFO_FILE = "bank_info.json"
INDEX_FILE = "index.npz"
CROPS_FILE = "crops.u8"

def aspect_group_codes(widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Group code (0=S, 1=T, 2=W) per box from its w/h: S in [0.5, 1.5] inclusive, T < 0.5, W > 1.5."""
    ratio = np.asarray(widths, np.float64) / np.asarray(heights, np.float64)
    codes = np.full(ratio.shape, GROUP_CODES["S"], np.uint8)
    codes[ratio < 0.5] = GROUP_CODES["T"]
    codes[ratio > 1.5] = GROUP_CODES["W"]
    return codes


@dataclass(frozen=True)
class BankSettings:
    """Everything that determines a bank's content; a bank is rebuilt iff these differ."""

    ann_file: str
    ann_size: int
    ann_mtime_ns: int
    dataset_hash: str
    seed: int
    neg_ratio: float
    max_side: int
    neg_max_tries: int
    min_box_side: float
    negatives_avoid: str
    version: int = BANK_VERSION


def ann_file_fingerprint(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Absolute path, size and mtime of an annotation file (cheap; what cache keys are made of)."""
    path = Path(ann_file).resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot stat annotation file ({exc})") from exc
    return {"ann_file": str(path), "ann_size": int(st.st_size), "ann_mtime_ns": int(st.st_mtime_ns)}


def dataset_hash(coco: CocoDataset) -> str:
    """Hash of what the bank is cut from: image ids/sizes/paths, boxes, labels and class names."""
    h = hashlib.sha1()
    h.update(json.dumps([list(coco.class_names), [int(c) for c in coco.category_ids]]).encode())
    for im in sorted(coco.images, key=lambda im: int(im.id)):
        h.update(f"{int(im.id)}:{int(im.width)}x{int(im.height)}:{Path(im.path).name};".encode())
        h.update(np.ascontiguousarray(im.boxes, np.float32).tobytes())
        h.update(np.ascontiguousarray(im.labels, np.int64).tobytes())
    return h.hexdigest()[:16]


def stored_shape(w: np.ndarray, h: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored (w, h) and factor per crop: unchanged if the longer side is <= max_side, else scaled down."""
    longer = np.maximum(w, h).astype(np.float64)
    factor = np.where(longer > max_side, max_side / np.maximum(longer, 1), 1.0)
    sw = np.where(factor < 1, np.maximum(1, np.round(w * factor)), w).astype(np.int64)
    sh = np.where(factor < 1, np.maximum(1, np.round(h * factor)), h).astype(np.int64)
    return sw, sh, factor


# --------------------------------------------------------------------------------------------------
# The bank
# --------------------------------------------------------------------------------------------------


class SampleBank:
    """Read access to a built bank: ``len(bank)``, ``bank.crop(i)`` (a read-only HxWx3 uint8 view into
    the memory-mapped file), per-sample arrays (``labels``, ``groups``, ``image_ids``, ...).

    Labels are ``0..C-1`` for the object classes and ``C`` (``background_label``) for negatives;
    ``num_classes`` is ``C + 1`` and ``class_names`` ends with ``"background"``.
    Pickles without the memory map (workers re-open the file lazily), so DataLoader workers stay cheap.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        info_path = self.directory / INFO_FILE
        if not info_path.is_file():
            raise DataError(f"{info_path}: no sample bank here (build it with SampleBank.build)")
        try:
            self.info: dict[str, Any] = json.loads(info_path.read_text())
            with np.load(self.directory / INDEX_FILE) as z:
                index = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{self.directory}: sample bank is corrupt ({exc}); delete it to rebuild") from exc
        self.offsets: np.ndarray = index["offsets"]
        self.shapes: np.ndarray = index["shapes"]  # (N, 2) stored h, w
        self.labels: np.ndarray = index["labels"]
        self.group_codes: np.ndarray = index["groups"]
        self.image_ids: np.ndarray = index["image_ids"]
        self.category_ids: np.ndarray = index["category_ids"]
        self.ann_ids: np.ndarray = index["ann_ids"]  # GT annotation id of each positive, -1 for negatives
        self.source_boxes: np.ndarray = index["source_boxes"]  # (N, 4) x, y, w, h in source pixels
        self.stored_scale: np.ndarray = index["stored_scale"]
        self._crops: np.ndarray | None = None
        self._rows: list[tuple[int, list[int]]] | None = None  # (offset, (h, w)) as Python ints, for speed

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike) -> SampleBank:
        """Open a bank written by ``build``."""
        return cls(directory)

    @classmethod
    def build(
        cls,
        coco: CocoDataset,
        out_dir: str | os.PathLike,
        *,
        seed: int,
        neg_ratio: float = 0.1,
        max_side: int = 448,
        neg_max_tries: int = 50,
        min_box_side: float = 1.0,
        negatives_avoid: str = DEFAULT_NEGATIVES_AVOID,
        progress: bool = True,
        read_fn: Callable[[Path], np.ndarray] | None = None,
    ) -> SampleBank:
        """Build the bank into ``out_dir`` (or reuse the one there if its settings match) and open it.

        ``max_side`` caps the stored crops' longer side (default 448 = 2x a 224 canvas).
        ``negatives_avoid``: "expanded_positives" or "boxes", what negatives have IoU 0 with (module
        docstring); part of the settings, so a bank built with the other value is rebuilt, not reused.
        ``read_fn`` decodes one image to HxWx3 uint8 RGB (default ``datamodules.readers.read_image``).
        """
        if max_side < 1:
            raise UserError(f"max_side must be >= 1, got {max_side}")
        out = Path(out_dir)
        settings = BankSettings(
            **ann_file_fingerprint(coco.ann_file),
            dataset_hash=dataset_hash(coco),
            seed=int(seed),
            neg_ratio=float(neg_ratio),
            max_side=int(max_side),
            neg_max_tries=int(neg_max_tries),
            min_box_side=float(min_box_side),
            negatives_avoid=check_negatives_avoid(negatives_avoid),
        )
        existing = read_bank_settings(out)
        if existing == asdict(settings):
            log.info("sample bank: reusing %s", out)
            bank = cls.open(out)
            bank.log_counts()
            return bank
        if existing is not None:
            log.info("sample bank: settings changed, rebuilding %s", out)

        if read_fn is None:
            from datamodules.readers import read_image

            read_fn = read_image
        plan = plan_samples(
            coco, seed=seed, neg_ratio=neg_ratio, neg_max_tries=neg_max_tries, min_box_side=min_box_side,
            negatives_avoid=negatives_avoid,
        )
        images = sorted(coco.images, key=lambda im: int(im.id))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bank-tmp-", dir=out.parent))
        try:
            info = _write_bank(tmp, plan, images, coco, settings, read_fn, progress)
            out.mkdir(parents=True, exist_ok=True)
            (out / INFO_FILE).unlink(missing_ok=True)  # invalidate first: never a stale info over new data
            for name in (CROPS_FILE, INDEX_FILE):
                os.replace(tmp / name, out / name)
            (out / INFO_FILE).write_text(json.dumps(info, indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bank = cls.open(out)
        log.info(
            "sample bank: %d samples (%d positives, %d negatives, %d small boxes skipped, %d negatives "
            "not placed) in %s, %.1f MB",
            len(bank), int((bank.labels < bank.background_label).sum()),
            int((bank.labels == bank.background_label).sum()), plan.skipped_small_boxes,
            plan.negatives_short, out, info["total_bytes"] / 1e6,
        )
        bank.log_counts()
        return bank

    # -- access -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.labels)

    def _map(self) -> np.ndarray:
        if self._crops is None:
            path = self.directory / CROPS_FILE
            if int(self.info["total_bytes"]) == 0:
                self._crops = np.zeros(0, np.uint8)
            else:
                mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(int(self.info["total_bytes"]),))
                self._crops = np.asarray(mapped)  # plain ndarray view: slicing it skips memmap's overhead
        return self._crops

    def crop(self, i: int) -> np.ndarray:
        """Sample ``i`` as a read-only (h, w, 3) uint8 RGB view (no copy)."""
        if self._rows is None:
            self._rows = list(zip(self.offsets.tolist(), self.shapes.tolist()))
        off, (h, w) = self._rows[i]
        return self._map()[off : off + h * w * 3].reshape(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_crops"] = None  # never pickle the mapped bytes; each process maps the file itself
        return state

    @property
    def groups(self) -> np.ndarray:
        """Aspect group per sample as strings "S", "T", "W"."""
        return np.asarray(GROUPS)[self.group_codes]

    @property
    def num_object_classes(self) -> int:
        """C, the number of object classes."""
        return int(self.info["num_object_classes"])

    @property
    def background_label(self) -> int:
        """Label of the negatives (= C)."""
        return self.num_object_classes

    @property
    def num_classes(self) -> int:
        """Number of labels in the bank: C object classes + 1 background."""
        return self.num_object_classes + 1

    @property
    def class_names(self) -> list[str]:
        """Names of labels 0..C, the last being "background"."""
        return [*self.info["class_names"], BACKGROUND_NAME]

    def group_indices(self, group: str) -> np.ndarray:
        """Sample indices of one aspect group."""
        return np.flatnonzero(self.group_codes == GROUP_CODES[group])

    def counts(self) -> dict[str, int]:
        """Flat counts for a logger: ``"<class>/<group>"``, ``"<class>/total"``, ``"total/<group>"``,
        ``"total"`` (class names include ``background``)."""
        out: dict[str, int] = {}
        table = np.zeros((self.num_classes, len(GROUPS)), np.int64)
        np.add.at(table, (self.labels, self.group_codes.astype(np.int64)), 1)
        for c, name in enumerate(self.class_names):
            for g, gname in enumerate(GROUPS):
                out[f"{name}/{gname}"] = int(table[c, g])
            out[f"{name}/total"] = int(table[c].sum())
        for g, gname in enumerate(GROUPS):
            out[f"total/{gname}"] = int(table[:, g].sum())
        out["total"] = int(table.sum())
        return out

    def counts_table(self) -> str:
        """The counts as a fixed-width text table (rows: classes, columns: groups)."""
        c = self.counts()
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"{'class':<{width}} " + " ".join(f"{g:>7}" for g in (*GROUPS, "total"))]
        for name in [*self.class_names, "total"]:
            keys = [f"{name}/{g}" for g in GROUPS] + [f"{name}/total" if name != "total" else "total"]
            lines.append(f"{name:<{width}} " + " ".join(f"{c[k]:>7}" for k in keys))
        return "\n".join(lines)

    def log_counts(self) -> dict[str, int]:
        """Log the counts table (INFO) and return the counts dict."""
        log.info("sample bank counts per class and aspect group:\n%s", self.counts_table())
        return self.counts()


def read_bank_settings(directory: Path) -> dict[str, Any] | None:
    info = directory / INFO_FILE
    if not (info.is_file() and (directory / INDEX_FILE).is_file() and (directory / CROPS_FILE).is_file()):
        return None
    try:
        return json.loads(info.read_text()).get("settings")
    except (OSError, ValueError):
        return None


def _write_bank(
    tmp: Path,
    plan: SamplePlan,
    images: list[Any],
    coco: CocoDataset,
    settings: BankSettings,
    read_fn: Callable[[Path], np.ndarray],
    progress: bool,
) -> dict[str, Any]:
    """Cut every planned crop (each source image decoded once) into ``tmp``; return bank_info."""
    n = len(plan.labels)
    w, h = plan.boxes[:, 2], plan.boxes[:, 3]
    sw, sh, factor = stored_shape(w, h, settings.max_side)
    nbytes = sw * sh * 3
    offsets = np.zeros(n, np.int64)
    if n:
        offsets[1:] = np.cumsum(nbytes)[:-1]
    total = int(nbytes.sum())
    with open(tmp / CROPS_FILE, "wb") as f:
        if total:
            f.truncate(total)
    crops = np.memmap(tmp / CROPS_FILE, np.uint8, mode="r+", shape=(total,)) if total else None

    starts = np.flatnonzero(np.r_[True, plan.image_index[1:] != plan.image_index[:-1]]) if n else np.zeros(0, int)
    ends = np.r_[starts[1:], n].astype(np.int64)
    bar = tqdm(total=len(starts), desc="sample bank", unit="img", leave=False, disable=not progress)
    for s, e in zip(starts, ends):
        im = images[int(plan.image_index[s])]
        pixels = read_fn(Path(im.path))
        if pixels.shape[:2] != (int(im.height), int(im.width)):
            raise DataError(
                f"{im.path}: decoded size {pixels.shape[1]}x{pixels.shape[0]} differs from the annotation's "
                f"{im.width}x{im.height}"
            )
        for k in range(s, e):
            x, y, bw, bh = (int(v) for v in plan.boxes[k])
            crop = pixels[y : y + bh, x : x + bw]
            if factor[k] < 1:
                crop = cv2.resize(crop, (int(sw[k]), int(sh[k])), interpolation=cv2.INTER_AREA)
            assert crops is not None
            crops[offsets[k] : offsets[k] + nbytes[k]] = np.ascontiguousarray(crop).reshape(-1)
        bar.update(1)
    bar.close()
    if crops is not None:
        crops.flush()
        del crops

    groups = aspect_group_codes(w, h)
    stored_scale = np.where(factor < 1, sw / np.maximum(w, 1), 1.0).astype(np.float32)
    np.savez(
        tmp / INDEX_FILE,
        offsets=offsets,
        shapes=np.stack([sh, sw], axis=1).astype(np.int32).reshape(-1, 2),
        labels=plan.labels,
        groups=groups,
        image_ids=plan.image_ids,
        category_ids=plan.category_ids,
        ann_ids=plan.ann_ids,
        source_boxes=plan.boxes.astype(np.int32).reshape(-1, 4),
        stored_scale=stored_scale,
    )
    used = {int(i) for i in np.unique(plan.image_ids)}
    return {
        "settings": asdict(settings),
        "image_dir": str(getattr(coco, "image_dir", "")),
        "num_object_classes": int(coco.num_classes),
        "class_names": list(coco.class_names),
        "category_ids": [int(c) for c in coco.category_ids],
        "num_samples": n,
        "total_bytes": total,
        "skipped_small_boxes": plan.skipped_small_boxes,
        "negatives_short": plan.negatives_short,
        "image_paths": {str(int(im.id)): str(im.path) for im in images if int(im.id) in used},
    }
