"""Montage assembly vs a standard ImageNet-style train pipeline, per CPU core.

All sides run in this one process with one thread each (``torch.set_num_threads(1)``,
``cv2.setNumThreads(1)``; PIL is single-threaded), on the same source photos, alternating in rounds so
that load from other processes hits them alike; the reported time per item is the median over rounds
and the headline ratio is the median of the per-round ratios.

- montage side (what a DataLoader worker now does), per montage (= one 224x224 training image holding
  4 samples): draw 2 S + 1 T + 1 W samples from the sample bank (memory-mapped, decoded uint8 crops,
  page-cached), random rescale, flip, pad/crop into the canvas (``MontageDataset.__getitems__``), then
  ``collate_montages`` over a batch: labels/boxes stacked and the canvases copied into one **uint8**
  (B, 3, H, W) batch (channels-last memory). No float conversion, no normalisation. Building the bank
  is a one-off cost per dataset and is reported separately, not amortised.
- on-device normalisation, reported separately, per montage: ``normalize_images`` (uint8 ->
  ImageNet-normalised float32, contiguous NCHW), which ``MontageModule.on_after_batch_transfer`` runs
  on the training device after the transfer; timed here on the CPU (its OpenCV table look-up path),
  i.e. what it costs in the main process when training on a CPU. On a GPU it is one cast + one
  ``addcmul`` kernel over the batch (not measured here).
- reference side, per image (unchanged): read the JPEG file, decode it with PIL
  (``Image.open(...).convert("RGB")``), ``RandomResizedCrop(224)`` (bilinear, antialias),
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(ImageNet mean/std)`` (torchvision.transforms,
  as in torchvision's references/classification), then ``default_collate`` over a batch.

The ratio "per image" compares one training image with one training image (a montage vs one
RandomResizedCrop); the ratio "per sample" counts the 4 samples a montage carries. Ratios are given
for the worker's work alone and with the CPU normalisation added.

Usage: ``.venv/bin/python benchmarks/montage_throughput.py [--rounds 25] [--batch 64]``; writes
benchmarks/results/montage_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def source_photos() -> tuple[list[Path], object, str]:
    """(JPEG paths, a CocoDataset over them, description): the embedded dataset's train split if the
    builder is available, else generated JPEGs (crops of scikit-image's bundled photos)."""
    from datamodules.readers import load_coco

    try:
        from datamodules.layout import resolve_dataset

        paths = resolve_dataset(None)
        coco = load_coco(paths.train_ann, paths.train_images)
        return [im.path for im in coco.images], coco, f"embedded dataset train split ({paths.root})"
    except Exception as exc:  # the builder needs Debian packages; fall back to generated photos
        from tests.test_sample_bank import write_coco

        root = Path(tempfile.mkdtemp(prefix="montage-bench-"))
        ann, imgs = write_coco(root, n_images=64, boxes_per_image=6, size_range=(240, 400))
        jpgs = []
        for p in sorted(imgs.glob("*.png")):
            from PIL import Image

            Image.open(p).save(p.with_suffix(".jpg"), quality=90)
            jpgs.append(p.with_suffix(".jpg"))
        coco = load_coco(ann, imgs)
        return jpgs, coco, f"generated JPEGs (embedded dataset unavailable: {exc})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--montages", type=int, default=128, help="montages per round")
    ap.add_argument("--images", type=int, default=64, help="reference images per round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--canvas", type=int, default=224)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    photos, coco, source = source_photos()
    bank_dir = Path(tempfile.mkdtemp(prefix="montage-bench-bank-"))
    try:
        result = _measure(args, photos, coco, source, bank_dir)
    finally:
        shutil.rmtree(bank_dir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "montage_throughput.json").write_text(json.dumps(result, indent=1))
    (args.out / "montage_throughput.md").write_text(_markdown(result))
    print(_markdown(result))


def _measure(args: argparse.Namespace, photos: list[Path], coco: object, source: str, bank_dir: Path) -> dict:
    import torchvision
    from PIL import Image
    from torch.utils.data import default_collate
    from torchvision import transforms as T

    from common.images import IMAGENET_MEAN, IMAGENET_STD, normalize_images
    from datamodules.montage import MontageDataset, collate_montages
    from datamodules.montage_assembler import MontageAssembler
    from datamodules.sample_bank import SampleBank
    from models.montage_canvas import MontageLayout

    t0 = time.perf_counter()
    bank = SampleBank.build(coco, bank_dir / "bank", seed=0, max_side=2 * args.canvas, progress=False)
    build_s = time.perf_counter() - t0
    dataset = MontageDataset(MontageAssembler(bank, MontageLayout((args.canvas, args.canvas))), 10**9, seed=0)
    reference = T.Compose([
        T.RandomResizedCrop(args.canvas, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    torch.manual_seed(0)

    def run_montages(start: int, n: int) -> float:
        t = time.perf_counter()
        for b in range(0, n, args.batch):
            # exactly what a DataLoader worker does for one batch
            batch = collate_montages(dataset.__getitems__([start + i for i in range(b, min(n, b + args.batch))]))
        assert batch.images.dtype == torch.uint8
        return (time.perf_counter() - t) / n

    # fixed uint8 batches for the normalisation timing (its cost does not depend on the pixel values)
    uint8_batches = [collate_montages(dataset.__getitems__(list(range(b, min(args.montages, b + args.batch)))))
                     .images for b in range(0, args.montages, args.batch)]

    def run_normalise() -> float:
        t = time.perf_counter()
        for images in uint8_batches:
            out = normalize_images(images)  # as on_after_batch_transfer with runtime.channels_last=false
        assert out.dtype == torch.float32 and out.is_contiguous()
        return (time.perf_counter() - t) / args.montages

    def run_reference(start: int, n: int) -> float:
        t = time.perf_counter()
        for b in range(0, n, args.batch):
            items = []
            for i in range(b, min(n, b + args.batch)):
                with Image.open(photos[(start + i) % len(photos)]) as im:
                    items.append(reference(im.convert("RGB")))
            batch = default_collate(items)
        assert batch.dtype == torch.float32
        return (time.perf_counter() - t) / n

    load_at_start = list(os.getloadavg())
    run_montages(0, args.batch)  # warm-up: page cache, allocator
    run_normalise()
    run_reference(0, args.batch)
    mont, norm, ref = [], [], []
    for r in range(args.rounds):
        mont.append(run_montages((r + 1) * args.montages, args.montages))
        norm.append(run_normalise())
        ref.append(run_reference(r * args.images, args.images))
    m_med, n_med, r_med = statistics.median(mont), statistics.median(norm), statistics.median(ref)
    paired = [rr / mm for rr, mm in zip(ref, mont)]  # each round's sides ran back to back
    paired_norm = [rr / (mm + nn) for rr, mm, nn in zip(ref, mont, norm)]
    with Image.open(photos[0]) as im:
        photo_size = im.size

    return {
        "command": " ".join([".venv/bin/python", "benchmarks/montage_throughput.py", *map(shlex.quote, sys.argv[1:])]),
        "source": source,
        "num_photos": len(photos),
        "photo_size_example": list(photo_size),
        "bank": {"samples": len(bank), "build_seconds": round(build_s, 2),
                 "bytes": int(bank.info["total_bytes"]), "counts": bank.counts()},
        "canvas": args.canvas,
        "batch": args.batch,
        "rounds": args.rounds,
        "montage_output": "uint8 (B, 3, H, W), channels-last memory; normalised on the device",
        "montage_seconds_per_item_rounds": mont,
        "cpu_normalise_seconds_per_item_rounds": norm,
        "reference_seconds_per_item_rounds": ref,
        "montages_per_s": 1 / m_med,
        "cpu_normalise_per_s": 1 / n_med,
        "reference_images_per_s": 1 / r_med,
        "ratio_per_image": statistics.median(paired),
        "ratio_per_sample": 4 * statistics.median(paired),
        "ratio_per_image_of_medians": r_med / m_med,
        "ratio_per_image_best_rounds": min(ref) / min(mont),
        "ratio_per_image_each_round": paired,
        "ratio_per_image_quartiles": [float(q) for q in np.percentile(paired, [25, 75])],
        "ratio_per_image_with_cpu_normalise": statistics.median(paired_norm),
        "ratio_per_sample_with_cpu_normalise": 4 * statistics.median(paired_norm),
        "ratio_per_image_with_cpu_normalise_quartiles": [float(q) for q in np.percentile(paired_norm, [25, 75])],
        "threads": {"torch": torch.get_num_threads(), "cv2": cv2.getNumThreads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "opencv": cv2.__version__, "numpy": np.__version__},
        "machine": {"cpu": _cpu_name(), "cpus_visible": os.cpu_count(), "loadavg_at_start": load_at_start},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _markdown(r: dict) -> str:
    m_ms = 1e3 / r["montages_per_s"]
    n_ms = 1e3 / r["cpu_normalise_per_s"]
    i_ms = 1e3 / r["reference_images_per_s"]
    q, qn = r["ratio_per_image_quartiles"], r["ratio_per_image_with_cpu_normalise_quartiles"]
    return f"""# Montage assembly throughput (one CPU core)

Command: `{r["command"]}`

Source photos: {r["source"]}, {r["num_photos"]} photos (e.g. {r["photo_size_example"][0]}x{r["photo_size_example"][1]} JPEG).
Sample bank: {r["bank"]["samples"]} samples, {r["bank"]["bytes"] / 1e6:.1f} MB, built once in {r["bank"]["build_seconds"]} s
(one-off per dataset, not included below). Canvas {r["canvas"]}x{r["canvas"]}, batches of {r["batch"]},
torch/cv2 threads = {r["threads"]["torch"]}/{r["threads"]["cv2"]}; {r["rounds"]} alternating rounds (montage, normalisation, reference),
times are medians. Machine: {r["machine"]["cpu"]}, {r["machine"]["cpus_visible"]} visible cores shared with other users
(load average at start {", ".join(f"{v:.1f}" for v in r["machine"]["loadavg_at_start"])}).

What each side includes:

- **montage (DataLoader worker)**: draw 4 bank samples (decoded uint8 crops, memory-mapped), rescale,
  flip, pad/crop into the canvas; labels/boxes; `collate_montages` copying the canvases into one
  **uint8** (B, 3, H, W) batch (channels-last memory). No float conversion and no normalisation: the
  workers send 150 KB per montage, not 600 KB of float32.
- **normalisation (on the training device)**: `normalize_images`, uint8 -> ImageNet-normalised float32
  NCHW, run by `MontageModule.on_after_batch_transfer` after the batch reaches the device. Timed here
  **on the CPU** (OpenCV table look-up), i.e. its cost in the main process when training on a CPU; on a
  GPU it is one cast + one `addcmul` kernel (not measured here).
- **ImageNet-style reference** (unchanged): read + PIL-decode the JPEG, RandomResizedCrop(224),
  RandomHorizontalFlip, ToTensor, Normalize; `default_collate`. It includes its float conversion and
  normalisation, in the worker.

| pipeline | what one item includes | ms / item | items / s |
|---|---|---:|---:|
| montage (worker) | 4 bank samples: rescale, flip, pad/crop into the canvas; labels/boxes; collate to a uint8 batch | {m_ms:.3f} | {r["montages_per_s"]:.0f} |
| normalisation on a CPU device | `normalize_images`: uint8 -> float32, ImageNet mean/std, NCHW | {n_ms:.3f} | {r["cpu_normalise_per_s"]:.0f} |
| ImageNet-style (worker) | read + PIL-decode the JPEG, RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize; default_collate | {i_ms:.3f} | {r["reference_images_per_s"]:.0f} |

| ratio (montage faster by) | value |
|---|---:|
| per training image, worker work: one uint8 montage vs one RandomResizedCrop image (median of per-round ratios) | **{r["ratio_per_image"]:.1f}x** |
| per training image, worker work, quartiles over rounds | {q[0]:.1f}x - {q[1]:.1f}x |
| per training image, worker work, ratio of the median times above | {r["ratio_per_image_of_medians"]:.1f}x |
| per training image, worker work, best round vs best round | {r["ratio_per_image_best_rounds"]:.1f}x |
| per sample image, worker work: a montage carries 4 samples | **{r["ratio_per_sample"]:.1f}x** |
| per training image, montage + its normalisation on the CPU vs the reference (median of per-round ratios) | **{r["ratio_per_image_with_cpu_normalise"]:.1f}x** |
| per training image, montage + CPU normalisation, quartiles over rounds | {qn[0]:.1f}x - {qn[1]:.1f}x |
| per sample image, montage + CPU normalisation | {r["ratio_per_sample_with_cpu_normalise"]:.1f}x |

Target (montage >= 10x faster per training image, DataLoader work): {"met" if r["ratio_per_image"] >= 10 else "NOT met"}
({r["ratio_per_image"]:.1f}x); {"met" if r["ratio_per_sample"] >= 10 else "NOT met"} per sample image. With the normalisation counted on a CPU device as
well, {r["ratio_per_image_with_cpu_normalise"]:.1f}x per training image: that is the honest figure for CPU-only training, where
the normalisation moves from the workers to the main process but does not disappear. On a GPU the
normalisation runs on the device, off the CPU data path. The montage side never decodes a JPEG (the
bank holds decoded crops) and no longer converts to float; what remains is resizing the visible parts
of 4 crops and copying the 150 KB uint8 canvas. The reference's photos here are small
({r["photo_size_example"][0]}x{r["photo_size_example"][1]}), so its decode is cheap (decode cost grows with a photo's pixel count; the
montage side's cost does not depend on the photo size; not measured here). Both sides run in the main
process here; inside a real worker the montage batch is allocated in shared memory (saving the copy
when it is sent to the main process) and the reference's `default_collate` does the same.

The two cores are shared with other developers' jobs, so absolute times vary from run to run by up
to 2-3x; the alternating short rounds make the *ratios* the meaningful numbers.
"""


if __name__ == "__main__":
    main()
