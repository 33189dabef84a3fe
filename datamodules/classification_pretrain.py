"""Classification data for supervised pre-training with the Bag of Tricks (He et al., CVPR 2019).

Sources (``data.source``; ``auto`` picks from ``data.root``):

- ``fashion_mnist``: the IDX files of Fashion-MNIST (60k train / 10k test, 28x28 grey), by default from
  the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); ``--data`` may
  name another folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Auto-detected from
  those file names, or with ``--data fashion-mnist``.
- ``folder``: an ImageFolder (``DATA/train/<class>/``, ``DATA/val/<class>/``);
- ``crops``: object crops of a COCO-format dataset, the embedded one when ``data.root`` is null
  (its "ImageNet stand-in").

The last two are read by the fine-tuning reader (``datamodules.classification``), decoded once into
uint8 tensors of side ``data.decode_size``. Every source ends up as an ``ImageCache`` in memory.

Transforms (the paper's Sec. 2.1), applied per batch with tensor ops in the loader's collate:

- train (`TrainTransform`): RandomResizedCrop (area ``crop_scale`` [0.08, 1], aspect ``crop_ratio``
  [3/4, 4/3], torchvision's 10-tries-then-centre rule) to ``image_size``, horizontal flip (0.5),
  brightness / saturation scaled by U[1 - j, 1 + j] and hue rotated by U[-j, j] x 180 degrees
  (j = ``color_jitter`` = 0.4, GluonCV's values; hue as a YIQ rotation like MXNet's HueJitterAug), PCA
  lighting noise alpha ~ N(0, ``lighting_std``) (`datamodules.lighting`), ImageNet normalisation;
- eval (`eval_resize_crop`): resize the short side to ``image_size * eval_resize_ratio`` (256/224),
  centre crop ``image_size``, normalise. Done once for the whole val split at setup.

Grey images (Fashion-MNIST) are replicated to RGB before the colour steps.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from common.errors import DataError, UserError
from common.images import normalize_255
from datamodules.classification import ImageCache, coco_crops, folder_images, is_image_folder
from datamodules.finetune_common import labelled_subset, loader_kwargs, subset_from_config, val_loader
from datamodules.lighting import IMAGENET_EIGVAL, IMAGENET_EIGVEC, lighting_offset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot"]
SOURCES = ("auto", "fashion_mnist", "folder", "crops")

# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class SupervisedBatch:
    images: torch.Tensor  # (B, 3, S, S) float32, ImageNet-normalised
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64: row in the split's cache


# ------------------------------------------------------------------------------------------ IDX files
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): magic = 0, 0, type code, number of dimensions;
    then one big-endian int32 per dimension; then the data, row-major."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise DataError(f"{path}: expected {count * dtype.itemsize} data bytes for shape {dims}, "
                        f"found {len(raw) - offset}")
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def is_fashion_mnist(root: Path) -> bool:
    return _idx_file(root, "train-images-idx3-ubyte") is not None


def fashion_mnist(root: str | Path, split: str) -> ImageCache:
    """Fashion-MNIST (or MNIST) split "train" / "val" (= t10k) as a (N, 1, 28, 28) uint8 cache."""
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    paths = [_idx_file(root, f"{prefix}-images-idx3-ubyte"), _idx_file(root, f"{prefix}-labels-idx1-ubyte")]
    if None in paths:
        hint = " (install it: apt-get install -y dataset-fashion-mnist)" if root == FASHION_MNIST_DIR else ""
        raise DataError(f"{root}: missing {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]{hint}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: IDX shapes {images.shape} / {labels.shape} are not N x H x W images + N labels")
    names = FASHION_MNIST_CLASSES if int(labels.max()) < len(FASHION_MNIST_CLASSES) else [str(i) for i in range(int(labels.max()) + 1)]
    return ImageCache(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), list(names))


# ------------------------------------------------------------------------------------------ transforms
def to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def random_resized_crop_params(
    b: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None,
    tries: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop parameters for a batch, vectorised: `tries` candidates of
    (area fraction ~ U(scale), log-aspect ~ U(log ratio)) per image, the first that fits; else the whole
    image cropped to the nearest allowed aspect. Returns crop width, height (pixels) and left, top."""
    area = torch.empty(b, tries).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    cw = (area * aspect).sqrt().round()
    ch = (area / aspect).sqrt().round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    # fallback: centre crop at the clamped aspect
    in_ratio = w / h
    fw, fh = (w, round(w / ratio[0])) if in_ratio < ratio[0] else ((round(h * ratio[1]), h) if in_ratio > ratio[1] else (w, h))
    rows = torch.arange(b)
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, cw[rows, pick], torch.tensor(float(fw)))
    ch = torch.where(first >= 0, ch[rows, pick], torch.tensor(float(fh)))
    u = torch.rand(b, 2, generator=generator)
    left = torch.where(first >= 0, (u[:, 0] * (w - cw + 1)).floor(), (w - cw) // 2)
    top = torch.where(first >= 0, (u[:, 1] * (h - ch + 1)).floor(), (h - ch) // 2)
    return cw, ch, left, top


def resized_crops(images: torch.Tensor, cw: torch.Tensor, ch: torch.Tensor, left: torch.Tensor, top: torch.Tensor,
                  size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear resample of the given pixel windows of a float batch to size x size (one grid_sample);
    `flip` (bool per image) mirrors horizontally."""
    b, _, h, w = images.shape
    sx = cw / w
    tx = (2 * left + cw) / w - 1  # window centre in [-1, 1]
    sy = ch / h
    ty = (2 * top + ch) / h - 1
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# RGB <-> YIQ (NTSC); a hue change is a rotation of the I/Q plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_GREY = torch.tensor([0.299, 0.587, 0.114])


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-image brightness factor, saturation factor and hue rotation (fraction of half a turn) on a
    0-255 float RGB batch: x*b; grey + s*(x - grey); YIQ rotation by hue*pi. Clamped to [0, 255]."""
    x = x * brightness.view(-1, 1, 1, 1)
    grey = torch.einsum("bchw,c->bhw", x, _GREY.to(x)).unsqueeze(1)
    x = grey + saturation.view(-1, 1, 1, 1) * (x - grey)
    angle = hue * math.pi
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(hue), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = (_YIQ2RGB @ rot @ _RGB2YIQ).to(x)  # (B, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", m, x)
    return x.clamp_(0, 255)


class TrainTransform:
    """The Bag of Tricks training augmentation on a uint8 (B, C, H, W) batch -> normalised float (B, 3, S, S)."""

    def __init__(self, size: int, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
                 color_jitter: float = 0.4, lighting_std: float = 0.1, generator: torch.Generator | None = None) -> None:
        self.size, self.crop_scale, self.crop_ratio = int(size), tuple(crop_scale), tuple(crop_ratio)
        self.flip_p, self.jitter, self.lighting_std, self.generator = flip_p, float(color_jitter), float(lighting_std), generator
        self.eigval, self.eigvec = torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        g = self.generator
        cw, ch, left, top = random_resized_crop_params(b, h, w, self.crop_scale, self.crop_ratio, g)
        flip = torch.rand(b, generator=g) < self.flip_p
        x = to_rgb(resized_crops(images.float(), cw, ch, left, top, self.size, flip))
        if self.jitter > 0:
            j = self.jitter
            bri, sat = (torch.empty(b).uniform_(1 - j, 1 + j, generator=g) for _ in range(2))
            x = color_jitter(x, bri, sat, torch.empty(b).uniform_(-j, j, generator=g))
        if self.lighting_std > 0:
            alpha = torch.randn(b, 3, generator=g) * self.lighting_std
            x = x + lighting_offset(alpha, self.eigval, self.eigvec)[:, :, None, None]
            x = x.clamp_(0, 255)
        return normalize_255(x.contiguous())


def eval_resize_crop(images: torch.Tensor, size: int, resize_ratio: float = 256 / 224, chunk: int = 2048) -> torch.Tensor:
    """Resize the short side to round(size * resize_ratio) (bilinear, antialiased) and centre crop size x size:
    uint8 (N, C, H, W) -> uint8 (N, C, size, size)."""
    n, c, h, w = images.shape
    short = round(size * resize_ratio)
    nh, nw = max(short, round(h * short / min(h, w))), max(short, round(w * short / min(h, w)))
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for i in range(0, n, chunk):
        r = F.interpolate(images[i:i + chunk].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = r[:, :, y0:y0 + size, x0:x0 + size].round_().clamp_(0, 255).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------ data module
class _TrainCollate:
    def __init__(self, cache: ImageCache, rows: torch.Tensor, transform: TrainTransform) -> None:
        self.cache, self.rows, self.transform = cache, rows, transform

    def __call__(self, index: list[int]) -> SupervisedBatch:
        rows = self.rows[torch.as_tensor(index, dtype=torch.long)]
        return SupervisedBatch(self.transform(self.cache.images[rows]), self.cache.labels[rows], rows)


class _EvalCollate:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __call__(self, index: list[int]) -> SupervisedBatch:
        idx = torch.as_tensor(index, dtype=torch.long)
        return SupervisedBatch(normalize_255(to_rgb(self.images[idx]).float()), self.labels[idx], idx)


def resolve_source(d: DictConfig) -> str:
    source = str(d.get("source", "auto"))
    if source not in SOURCES:
        raise UserError(f"data.source must be one of {', '.join(SOURCES)}, got '{source}'")
    if source != "auto":
        return source
    if d.root is None:
        return "crops"
    if str(d.root) in ("fashion-mnist", "fashion_mnist"):
        return "fashion_mnist"
    root = Path(d.root).expanduser()
    if root.is_dir() and is_fashion_mnist(root):
        return "fashion_mnist"
    if root.is_dir() and is_image_folder(root):
        return "folder"
    return "crops"


class SupervisedDataModule(L.LightningDataModule):
    """Train / val splits of a classification source with the Bag of Tricks transforms (module docstring).

    ``data.label_count`` / ``data.label_fraction`` train on a seeded subset (``data.subset_seed``): of the
    images for a COCO source (their crops; the subset ``finetune.py --label-fraction`` uses), of the samples
    otherwise; ``data.val_count`` evaluates on a seeded subset of val (quick runs, benchmarks)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.source = resolve_source(cfg.data)
        self._cache: dict[str, ImageCache] = {}
        self.train_rows: torch.Tensor | None = None
        self.val_images: torch.Tensor | None = None
        self.val_labels: torch.Tensor | None = None

    def split(self, name: str) -> ImageCache:
        if name in self._cache:
            return self._cache[name]
        d = self.cfg.data
        if self.source == "fashion_mnist":
            root = FASHION_MNIST_DIR if d.root is None or str(d.root) in ("fashion-mnist", "fashion_mnist") else Path(d.root)
            cache = fashion_mnist(root, name)
        elif self.source == "folder":
            cache = folder_images(Path(d.root).expanduser() / name, int(d.decode_size))
        else:
            from datamodules.layout import resolve_dataset

            paths = resolve_dataset(d.root, embedded_size=int(d.embedded_size), seed=int(d.embedded_seed))
            ann, images = (paths.train_ann, paths.train_images) if name == "train" else (paths.val_ann, paths.val_images)
            # the labelled images: the same nested subset finetune.py --label-fraction trains on
            subset = (lambda n: subset_from_config(n, self.cfg)) if name == "train" and self.subsets_images else None
            cache = coco_crops(ann, images, int(d.decode_size), float(d.crop_context), float(d.min_box_size), subset)
        self._cache[name] = cache
        return cache

    @property
    def subsets_images(self) -> bool:
        """A COCO source with ``data.label_fraction`` / ``label_count``: the subset is of images, not crops."""
        d = self.cfg.data
        return self.source == "crops" and (d.get("label_fraction") is not None or d.get("label_count") is not None)

    @property
    def class_names(self) -> list[str]:
        return self.split("train").class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        if self.source == "crops":
            from datamodules.layout import resolve_dataset

            d = self.cfg.data
            resolve_dataset(d.root, embedded_size=int(d.embedded_size), seed=int(d.embedded_seed))

    def setup(self, stage: str | None = None) -> None:
        d = self.cfg.data
        if self.train_rows is None:
            train = self.split("train")
            if self.subsets_images:  # the crops of the labelled images only (split("train") cut them)
                self.train_rows = torch.arange(len(train.labels))
            else:
                self.train_rows = torch.from_numpy(subset_from_config(len(train.labels), self.cfg)).long()
        if self.val_images is None:
            val = self.split("val")
            if val.class_names != self.class_names:
                raise DataError(f"train and val have different classes ({self.class_names} vs {val.class_names})")
            rows = torch.from_numpy(labelled_subset(len(val.labels), None, d.get("val_count"), int(d.get("subset_seed", 0))))
            self.val_images = eval_resize_crop(val.images[rows], int(d.image_size), float(d.eval_resize_ratio))
            self.val_labels = val.labels[rows]

    def train_transform(self) -> TrainTransform:
        d = self.cfg.data
        return TrainTransform(int(d.image_size), tuple(d.crop_scale), tuple(d.crop_ratio), float(d.flip_p),
                              float(d.color_jitter), float(d.lighting_std))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        bs = int(self.cfg.data.batch_size)
        n = len(self.train_rows)
        if n < bs:
            raise UserError(f"data.batch_size {bs} is larger than the {n} training images")
        collate = _TrainCollate(self.split("train"), self.train_rows, self.train_transform())
        # the items are row numbers into the cache; the collate function gathers and transforms a whole batch
        return DataLoader(range(n), batch_size=bs, shuffle=True, drop_last=True, collate_fn=collate,
                          **loader_kwargs(self.cfg))

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return val_loader(range(len(self.val_labels)), int(self.cfg.data.val_batch_size),
                          _EvalCollate(self.val_images, self.val_labels), self.cfg)
