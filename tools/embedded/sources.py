"""Where the embedded dataset's pixels come from: the curated Tux Paint photo stamps (objects, one of 10
classes each, split into train-only and val-only stamps) and the background photos (Debian's mate-backgrounds,
scikit-image and scikit-learn sample images). ``tools.embedded.builder`` composites them.

Tests patch ``STAMP_ROOT`` / ``STAMP_LIST`` here; the functions read them at call time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common.errors import DataError

STAMP_ROOT = Path("/usr/share/tuxpaint/stamps")
MATE_NATURE_DIR = Path("/usr/share/backgrounds/mate/nature")
STAMP_LIST = Path(__file__).with_name("stamps.tsv")
INSTALL_COMMAND = "apt-get install -y tuxpaint-stamps-default mate-backgrounds"

CLASSES: tuple[str, ...] = (
    "mammal", "bird", "fish", "insect", "flower", "plant", "fruit", "vegetable", "vehicle", "household",
)
SPLITS = ("train", "val")
VAL_STAMP_EVERY = 5  # every 5th stamp of a class is reserved for val

MATE_BACKGROUNDS = ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "GreenMeadow.jpg", "RainDrops.jpg", "Storm.jpg", "Wood.jpg")
SKIMAGE_BACKGROUNDS = (
    "astronaut.png", "rocket.jpg", "hubble_deep_field.jpg", "camera.png", "moon.png",
    "brick.png", "grass.png", "gravel.png",
)
SKLEARN_BACKGROUNDS = ("china.jpg",)


# ----------------------------------------------------------------------------------------- stamps
@dataclass(frozen=True)
class StampEntry:
    path: str  # relative to STAMP_ROOT
    cls: str


def read_stamp_list(path: Path | None = None) -> list[StampEntry]:
    """The curated stamps (default ``STAMP_LIST``), in file order; ``#`` comments and the header skipped."""
    path = STAMP_LIST if path is None else path
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#") or line == "path\tclass":
            continue
        parts = line.split("\t")
        if len(parts) != 2 or parts[1] not in CLASSES:
            raise DataError(f"{path}:{n}: expected '<path>\\t<class in {CLASSES}>', got {line!r}")
        entries.append(StampEntry(parts[0], parts[1]))
    return entries


def load_stamp_rgba(path: Path) -> np.ndarray | None:
    """A stamp as HxWx4 uint8 RGBA, or None if it has no transparency (then it is not a cut-out)."""
    try:
        with Image.open(path) as im:
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            if not has_alpha:
                return None
            return np.asarray(im.convert("RGBA"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read stamp ({exc})") from exc


def colour_richness(rgba: np.ndarray) -> float:
    """Unique colours (5 bits per channel) inside the alpha >= 128 mask / sqrt(mask area).

    Flat-shaded drawings score below 2, photographs above (the curation filter)."""
    mask = rgba[..., 3] >= 128
    area = int(mask.sum())
    if area == 0:
        return 0.0
    q = (rgba[..., :3][mask] >> 3).astype(np.int32)
    unique = np.unique((q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2]).size
    return float(unique / np.sqrt(area))


def split_stamps(stamps: list[StampEntry]) -> dict[str, dict[int, list[int]]]:
    """Per split, class index -> indices into ``stamps``. Every ``VAL_STAMP_EVERY``-th stamp of a class
    (in list order) is val-only; a class with 2..4 stamps gives its last one to val."""
    pools: dict[str, dict[int, list[int]]] = {s: {} for s in SPLITS}
    for label, cls in enumerate(CLASSES):
        members = [i for i, s in enumerate(stamps) if s.cls == cls]
        for k, i in enumerate(members):
            to_val = k % VAL_STAMP_EVERY == VAL_STAMP_EVERY - 1 or (
                1 < len(members) < VAL_STAMP_EVERY and k == len(members) - 1
            )
            pools["val" if to_val else "train"].setdefault(label, []).append(i)
    return pools


# ------------------------------------------------------------------------------------ backgrounds
@dataclass
class Background:
    name: str
    image: np.ndarray  # HxWx3 uint8 RGB
    gray: bool  # a grey texture: tinted with a random colour when used


def _read_background(path: Path, reduce: bool = False) -> np.ndarray:
    flags = cv2.IMREAD_REDUCED_COLOR_2 if reduce else cv2.IMREAD_COLOR
    img = cv2.imread(str(path), flags)
    if img is None:
        raise DataError(f"{path}: cannot read background image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _package_dir(name: str) -> Path:
    """Install folder of a package, found without importing it (sklearn takes a second to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"python package {name} is not installed (pip install -r requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def background_sources() -> list[tuple[str, Path]]:
    """(name, path) of every background photo, in a fixed order; raises if mate-backgrounds is missing."""
    sources = []
    missing = [n for n in MATE_BACKGROUNDS if not (MATE_NATURE_DIR / n).is_file()]
    if missing:
        raise DataError(
            f"background photos missing from {MATE_NATURE_DIR} ({', '.join(missing)}): install the Debian "
            f"packages (as root): {INSTALL_COMMAND}"
        )
    sources += [(f"mate/{n}", MATE_NATURE_DIR / n) for n in MATE_BACKGROUNDS]
    sk_dir = _package_dir("skimage") / "data"
    sources += [(f"skimage/{n}", sk_dir / n) for n in SKIMAGE_BACKGROUNDS if (sk_dir / n).is_file()]
    sl_dir = _package_dir("sklearn") / "datasets" / "images"
    sources += [(f"sklearn/{n}", sl_dir / n) for n in SKLEARN_BACKGROUNDS if (sl_dir / n).is_file()]
    return sources


def load_backgrounds() -> list[Background]:
    out = []
    for name, path in background_sources():
        img = _read_background(path, reduce=name.startswith("mate/"))  # mate photos are 1280..2560 px wide
        gray = bool(np.abs(img[..., 0].astype(np.int16) - img[..., 2]).max() <= 2)
        out.append(Background(name, img, gray))
    return out


def check_system_data() -> None:
    """Fail with the install command when the Debian packages are missing."""
    for what, folder in (("Tux Paint stamps", STAMP_ROOT), ("MATE background photos", MATE_NATURE_DIR)):
        if not folder.is_dir():
            raise DataError(f"{what} not found at {folder}: the embedded dataset needs the Debian packages; "
                            f"install them (as root): {INSTALL_COMMAND}")


def installed_stamps() -> list[StampEntry]:
    """The curated stamps, after checking that the installed package has every one of them."""
    stamps = read_stamp_list()
    missing = [s.path for s in stamps if not (STAMP_ROOT / s.path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} stamps listed in {STAMP_LIST} are missing from {STAMP_ROOT} (e.g. {missing[0]}): "
            f"install (as root) {INSTALL_COMMAND}, or re-run python -m tools.embedded.curate_stamps for this "
            "package version"
        )
    return stamps
