"""The embedded default dataset: real photo cut-outs composited onto real photo backgrounds.

Objects are the photographic Tux Paint stamps listed in ``tools/embedded/stamps.tsv`` (curated by
``tools/embedded/curate_stamps.py`` from the Debian package ``tuxpaint-stamps-default``, GPL-2), one of 10
classes each. Backgrounds are random crops (with flips and colour jitter) of photos bundled with
scikit-image and scikit-learn and of ``mate-backgrounds``' nature photos. Backgrounds whose subject is
one of the 10 classes (the cat ``chelsea``, the ``motorcycle``, the ``coffee`` cup, sklearn's
``flower.jpg``, mate's flower / ladybird / dandelion photos) are left out: they would put an
unannotated object of a known class into the "background".

Each image gets 1..``max_objects`` pasted objects (class drawn uniformly, then a stamp of that class;
random scale, horizontal flip, brightness, position; up to a quarter of an object may lie outside the
image; later objects may occlude earlier ones). Annotations are recomputed from what is visible:

- instance mask of object i = (its alpha >= 0.5) minus the masks (alpha >= 0.5) of all objects pasted
  after it; COCO ``segmentation`` is that mask as compressed RLE, ``bbox`` its tight box (x, y, w, h),
  ``area`` its pixel count. Objects whose visible part is tiny (< ``min_visible_area`` of the image or
  < ``min_visible_fraction`` of the object) are not annotated.
- semantic label PNG: 0 background, 1..10 = COCO category id of the visible object, 255 ignore. Ignore
  marks (a) the soft alpha edge of each object, 0.1 < alpha < 0.9, where no later object covers it
  (the pixel mixes object and what is behind it) and (b) the visible pixels of not-annotated objects.
  So every pixel with a class value k lies inside an annotated instance of category k.
- each annotation also records its source ``stamp`` (path under the stamp root); images are JPEG
  quality 92 without chroma subsampling.

Train and val use disjoint stamps (every 5th stamp of each class is val-only), so validation measures
recognition of unseen object instances. Everything is drawn from ``numpy.random.default_rng((seed,
split, index))``: the same settings give byte-identical JSON and identical pixels.

Layout written (the project layout; see ``datamodules.layout``)::

    DIR/images/{train,val}/000001.jpg
    DIR/annotations/instances_{train,val}.json
    DIR/masks/{train,val}/000001.png
    DIR/build_info.json          settings of the build; a build with equal settings is a no-op

CLI::

    python -m tools.embedded --out data/embedded [--size 300] [--seed 0] [--image-size 256]
    python -m tools.embedded --out data/embedded --preview preview.png
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

import tools.embedded.sources as sources
from common.errors import DataError, UserError
from common.paths import DEFAULT_DATA_DIR
from datamodules.transforms import color_jitter, random_crop_resize, resize
from tools.embedded.compositing import Composite, Layer, coco_annotation, composite
from tools.embedded.preview import write_preview
from tools.embedded.sources import (
    CLASSES,
    INSTALL_COMMAND,
    SPLITS,
    Background,
    StampEntry,
    background_sources,
    load_backgrounds,
    load_stamp_rgba,
    split_stamps,
)

BUILDER_VERSION = 1
_SPLIT_CODE = {"train": 1, "val": 2}


# ------------------------------------------------------------------------------------ the builder
@dataclass(frozen=True)
class EmbeddedConfig:
    size: int = 300  # train images
    val_size: int | None = None  # default: 20% of size (at least 1)
    seed: int = 0
    image_size: int = 256
    max_objects: int = 6
    scale: tuple[float, float] = (0.18, 0.6)  # object's long side / image side, log-uniform
    max_upscale: float = 2.0  # a small stamp is enlarged at most this much
    min_visible_area: float = 0.001  # of the image, below which an object is not annotated
    min_visible_fraction: float = 0.15  # of the object's own mask, below which it is not annotated
    jpeg_quality: int = 92  # written with 4:4:4 chroma (no subsampling: crisp object edges)

    def n_images(self, split: str) -> int:
        if split == "train":
            return self.size
        return self.val_size if self.val_size is not None else max(1, round(0.2 * self.size))


@dataclass
class Compositor:
    """Draws the random layout of image ``index`` of a split; stamps are decoded once, on first use."""

    cfg: EmbeddedConfig
    stamps: list[StampEntry]
    backgrounds: list[Background]
    stamp_root: Path | None = None  # default: sources.STAMP_ROOT
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.pools = split_stamps(self.stamps)
        self.stamp_root = sources.STAMP_ROOT if self.stamp_root is None else self.stamp_root

    def stamp(self, i: int) -> np.ndarray:
        """Stamp ``i`` cropped to its alpha, at most ``image_size`` on its long side, premultiplied float32."""
        if i not in self._cache:
            path = self.stamp_root / self.stamps[i].path
            if not path.is_file():
                raise DataError(
                    f"stamp {path} listed in {sources.STAMP_LIST.name} is missing: install (as root) "
                    f"{INSTALL_COMMAND}, or re-run python -m tools.embedded.curate_stamps for this package "
                    "version"
                )
            rgba = load_stamp_rgba(path)
            if rgba is None:
                raise DataError(f"stamp {path} has no alpha channel")
            ys, xs = np.nonzero(rgba[..., 3])
            rgba = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            h, w = rgba.shape[:2]
            s = min(1.0, self.cfg.image_size / max(h, w))
            # premultiply before resampling so that transparent pixels do not bleed dark fringes
            a = rgba[..., 3:4].astype(np.float32) / 255.0
            out = np.concatenate([rgba[..., :3].astype(np.float32) * a, a], axis=2)
            if s < 1.0:
                out = resize(out, max(2, round(w * s)), max(2, round(h * s)))
            self._cache[i] = out
        return self._cache[i]

    def background(self, rng: np.random.Generator) -> np.ndarray:
        bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        img = random_crop_resize(bg.image, self.cfg.image_size, rng)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if bg.gray:
            img = np.clip(img * rng.uniform(0.55, 1.25, size=3).astype(np.float32), 0, 255).astype(np.uint8)
        return color_jitter(np.ascontiguousarray(img), rng)

    def layers(self, rng: np.random.Generator, split: str) -> list[Layer]:
        size = self.cfg.image_size
        pool = self.pools[split]
        labels = sorted(pool)
        out = []
        for _ in range(int(rng.integers(1, self.cfg.max_objects + 1))):
            label = labels[int(rng.integers(len(labels)))]
            idx = pool[label][int(rng.integers(len(pool[label])))]
            rgba = self.stamp(idx)
            h, w = rgba.shape[:2]
            long_side = size * np.exp(rng.uniform(np.log(self.cfg.scale[0]), np.log(self.cfg.scale[1])))
            s = min(long_side / max(h, w), self.cfg.max_upscale)
            nw, nh = max(2, round(w * s)), max(2, round(h * s))
            obj = resize(rgba, nw, nh)
            if rng.random() < 0.5:
                obj = obj[:, ::-1]
            obj = np.ascontiguousarray(obj)
            obj[..., :3] *= rng.uniform(0.85, 1.15)
            x = int(rng.integers(-(nw // 4), size - nw + nw // 4 + 1))
            y = int(rng.integers(-(nh // 4), size - nh + nh // 4 + 1))
            out.append(Layer(obj, x, y, label, self.stamps[idx].path))
        return out

    def sample(self, split: str, index: int) -> Composite:
        rng = np.random.default_rng((self.cfg.seed, _SPLIT_CODE[split], index))
        bg = self.background(rng)
        layers = self.layers(rng, split)
        min_area = self.cfg.min_visible_area * self.cfg.image_size**2
        return composite(bg, layers, min_area, self.cfg.min_visible_fraction)


def build_settings(cfg: EmbeddedConfig, backgrounds: list[str]) -> dict:
    settings = asdict(cfg)
    settings["scale"] = list(cfg.scale)
    settings["val_size"] = cfg.n_images("val")
    settings["builder_version"] = BUILDER_VERSION
    settings["stamps_sha256"] = hashlib.sha256(sources.STAMP_LIST.read_bytes()).hexdigest()
    settings["backgrounds"] = backgrounds
    return settings


def _coco_header(split: str, cfg: EmbeddedConfig) -> dict:
    return {
        "info": {
            "description": f"cheaplunch embedded dataset ({split}): Tux Paint photo stamps on real photos",
            "version": str(BUILDER_VERSION),
            "seed": cfg.seed,
        },
        "licenses": [{"id": 1, "name": "GPL-2.0 (tuxpaint-stamps), backgrounds: see their packages", "url": ""}],
        "categories": [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(CLASSES)],
    }


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise builds of one directory across processes (parallel test runs, DDP ranks)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _outputs(root: Path) -> list[Path]:
    return [root / "images" / s for s in SPLITS] + [root / "masks" / s for s in SPLITS] + [
        root / "annotations" / f"instances_{s}.json" for s in SPLITS
    ]


def read_build_info(root: Path) -> dict | None:
    path = Path(root) / "build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_built(root: Path, settings: dict) -> bool:
    info = read_build_info(root)
    return bool(
        info and info.get("complete") and info.get("settings") == settings
        and all(p.exists() for p in _outputs(Path(root)))
    )


def build_embedded(
    out_dir: str | Path = DEFAULT_DATA_DIR,
    size: int = 300,
    seed: int = 0,
    image_size: int = 256,
    force: bool = False,
    *,
    val_size: int | None = None,
    max_objects: int = 6,
    scale: tuple[float, float] = EmbeddedConfig.scale,
    progress: bool = True,
) -> Path:
    """Build the embedded dataset into ``out_dir`` (project layout) and return ``out_dir``.

    A no-op when ``out_dir/build_info.json`` records a complete build with the same settings (sizes,
    seed, image size, stamp list hash, builder version); ``force`` rebuilds anyway. Refuses to write
    into a non-empty folder that is not an embedded build unless ``force``."""
    if size < 1 or image_size < 32 or max_objects < 1:
        raise UserError(f"embedded dataset: need size >= 1, image_size >= 32, max_objects >= 1 "
                        f"(got {size}, {image_size}, {max_objects})")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise UserError(f"embedded dataset: scale (object long side / image side) must satisfy "
                        f"0 < low <= high <= 1, got {tuple(scale)}")
    root = Path(out_dir)
    cfg = EmbeddedConfig(size=size, val_size=val_size, seed=seed, image_size=image_size, max_objects=max_objects,
                         scale=(float(scale[0]), float(scale[1])))
    sources.check_system_data()
    with _locked(root):
        settings = build_settings(cfg, [name for name, _ in background_sources()])
        if not force and is_built(root, settings):
            return root
        if read_build_info(root) is None and any(p.exists() for p in _outputs(root)) and not force:
            raise UserError(f"{root} holds a dataset that was not built by tools.embedded (no build_info.json); "
                            "choose another --out or pass --force to overwrite its images/, masks/, annotations/")
        _build(root, cfg, settings, progress)
    return root


def _build(root: Path, cfg: EmbeddedConfig, settings: dict, progress: bool) -> None:
    from tqdm import tqdm

    stamps = sources.installed_stamps()
    info_path = root / "build_info.json"
    info_path.write_text(json.dumps({"settings": settings, "complete": False}, indent=1))
    for p in _outputs(root):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    backgrounds = load_backgrounds()
    compositor = Compositor(cfg, stamps, backgrounds, sources.STAMP_ROOT)
    start = time.perf_counter()
    counts = {}
    total = sum(cfg.n_images(s) for s in SPLITS)
    with tqdm(total=total, desc=f"embedded dataset -> {root}", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            img_dir, mask_dir = root / "images" / split, root / "masks" / split
            img_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            coco = _coco_header(split, cfg)
            images, annotations = [], []
            for index in range(cfg.n_images(split)):
                comp = compositor.sample(split, index)
                stem = f"{index + 1:06d}"
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(comp.image, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality,
                                        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
                ok2, png = cv2.imencode(".png", comp.semantic)
                if not (ok and ok2):
                    raise DataError(f"could not encode image {stem} of {root}")
                (img_dir / f"{stem}.jpg").write_bytes(jpg.tobytes())
                (mask_dir / f"{stem}.png").write_bytes(png.tobytes())
                images.append({"id": index + 1, "file_name": f"{stem}.jpg",
                               "width": cfg.image_size, "height": cfg.image_size})
                for obj in comp.objects:
                    if obj.keep:
                        ann = coco_annotation(obj)
                        annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann,
                                            "stamp": obj.stamp})
                bar.update(1)
            coco["images"], coco["annotations"] = images, annotations
            ann_dir = root / "annotations"
            ann_dir.mkdir(exist_ok=True)
            (ann_dir / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
            counts[split] = {"images": len(images), "annotations": len(annotations)}
    info = {"settings": settings, "complete": True, "counts": counts, "classes": list(CLASSES),
            "seconds": round(time.perf_counter() - start, 2)}
    info_path.write_text(json.dumps(info, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.embedded",
        description="Build the embedded real-photo detection/segmentation dataset (cached by settings).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR, help="dataset folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=None, help="number of train images (default 300)")
    parser.add_argument("--val-size", type=int, default=None, help="number of val images (default: 20%% of --size)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--image-size", type=int, default=None, help="side of the square images in px (default 256)")
    parser.add_argument("--max-objects", type=int, default=None, help="objects per image: 1..this (default 6)")
    parser.add_argument("--scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="object long side / image side, drawn log-uniformly (default 0.18 0.6)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build with these settings exists")
    parser.add_argument("--preview", type=Path, metavar="FILE.png",
                        help="write a grid of images with boxes, class names and masks; with no build option "
                             "given, an existing build in --out is previewed as it is")
    parser.add_argument("--preview-split", choices=SPLITS, default="train")
    parser.add_argument("--preview-count", type=int, default=8)
    args = parser.parse_args(argv)
    options = {"size": args.size, "val_size": args.val_size, "seed": args.seed, "image_size": args.image_size,
               "max_objects": args.max_objects, "scale": tuple(args.scale) if args.scale else None}
    try:
        start = time.perf_counter()
        info = read_build_info(args.out)
        reuse = (args.preview and not args.force and all(v is None for v in options.values())
                 and info is not None and info.get("complete"))
        if not reuse:  # the options not given keep build_embedded's defaults
            build_embedded(args.out, force=args.force, **{k: v for k, v in options.items() if v is not None})
            info = read_build_info(args.out) or {}
        print(f"embedded dataset at {args.out} ({info.get('counts')}; {time.perf_counter() - start:.1f} s)")
        if args.preview:
            print(f"preview -> {write_preview(args.out, args.preview, args.preview_split, args.preview_count)}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
