"""How much does fine-tuning from scratch learn per CPU minute? The curve the bake-off's fine-tuning protocol
is chosen from (issue #12 §1): one setting per call, validated every ``--val-every`` steps, appended to
``benchmarks/results/finetune_protocol.json``; the markdown table and the AP (mIoU) against minutes plot are
re-drawn from every recorded setting.

    python benchmarks/finetune_protocol.py --name frcnn96 --task detection --image-size 96 --train-images 2000 \\
        --steps 600 --val-every 150 -- model.box_batch_size_per_image=32

Everything after ``--`` is passed to ``finetune.py`` as overrides. Minutes are wall time from the start of
fitting (``history.json``'s ``wall_s``), validation included; the machine is noted with each record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "finetune_protocol"


def _overrides(args: argparse.Namespace) -> list[str]:
    size, steps = args.image_size, args.steps
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={args.val_every}", "logging.num_images=0",
              f"data.batch_size={args.batch_size}", f"optim.name={args.optimizer}", f"optim.lr={args.lr}",
              "optim.lr_scaling=none", "optim.weight_decay=1e-4", f"schedule.warmup_steps={args.warmup}",
              "checkpoint.every_n_steps=100000"]
    if args.task == "detection":
        return [f"model.train_sizes=[{size}]", f"model.test_size={size}", f"model.max_size={size}",
                "data.val_batch_size=16", *common]
    return [f"data.base_size={size}", f"data.crop_size={size}", f"data.val_size={size}", *common]


def run(args: argparse.Namespace, extra: list[str]) -> dict:
    from cheaplunch.finetune import run_finetune
    from tools.embedded import build_embedded

    data_dir = Path(tempfile.gettempdir()) / "cheaplunch_protocol_data" / (
        f"n{args.train_images}_v{args.val_images}_s{args.image_size}_o{args.max_objects}"
        f"_x{args.scale[0]:g}-{args.scale[1]:g}_seed{args.data_seed}")
    build_embedded(data_dir, size=args.train_images, val_size=args.val_images, seed=args.data_seed,
                   image_size=args.image_size, max_objects=args.max_objects, scale=tuple(args.scale), progress=False)
    out = Path(tempfile.mkdtemp(prefix="protocol-run-"))
    overrides = [*_overrides(args), f"seed={args.seed}", *extra]
    start = time.time()
    try:
        res = run_finetune(args.task, detector=args.detector if args.task == "detection" else None,
                           backbone="scratch", data=str(data_dir), out=out, logger="none", resume="never",
                           overrides=overrides)
        history = json.loads((out / "history.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    metric = "bbox" if args.task == "detection" else None
    curve = []
    for h in history:
        m = h["metrics"][metric] if metric else h["metrics"]
        curve.append({"step": h["step"], "minutes": round(h["wall_s"] / 60, 2),
                      **({"AP": round(100 * m["AP"], 2), "AP50": round(100 * m["AP50"], 2)} if metric else
                         {"mIoU": round(100 * m["mIoU"], 2)})})
    return {"name": args.name, "task": args.task, "detector": args.detector if args.task == "detection" else None,
            "data": {"train_images": args.train_images, "val_images": args.val_images, "image_size": args.image_size,
                     "max_objects": args.max_objects, "scale": list(args.scale), "seed": args.data_seed},
            "overrides": overrides, "curve": curve, "process_minutes": round((time.time() - start) / 60, 2),
            "final": res.results, "machine": f"{platform.node()} {os.cpu_count()} CPUs",
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}


def write_report(records: list[dict]) -> None:
    lines = ["# Fine-tuning from scratch: quality against CPU minutes", "",
             "Written by `benchmarks/finetune_protocol.py` (one call per setting, command in each row's record in",
             "`finetune_protocol.json`). Minutes: wall time of fitting, validation included, on the 2-core CPU machine.",
             "AP / AP50 / mIoU in percent on the held-out val split of the embedded set built with the given settings.",
             "", "| setting | task | data (train/val, px, objects, object scale) | step | minutes | AP | AP50 | mIoU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        d = r["data"]
        for c in r["curve"]:
            lines.append(f"| {r['name']} | {r['task']}{'/' + r['detector'] if r['detector'] else ''} | "
                         f"{d['train_images']}/{d['val_images']}, {d['image_size']}, 1-{d['max_objects']}, "
                         f"{'-'.join(f'{x:g}' for x in d['scale'])} | {c['step']} | "
                         f"{c['minutes']} | {c.get('AP', '')} | {c.get('AP50', '')} | {c.get('mIoU', '')} |")
    lines += ["", "Overrides of each setting:", ""]
    lines += [f"- `{r['name']}`: `{' '.join(r['overrides'])}`" for r in records]
    (RESULTS / "finetune_protocol.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = "AP" if task == "detection" else "mIoU"
        for r in (r for r in records if r["task"] == task):
            ax.plot([c["minutes"] for c in r["curve"]], [c[key] for c in r["curve"]], marker="o", label=r["name"])
        ax.axvline(8, color="grey", linestyle=":", label="8 min")
        ax.set(xlabel="fine-tuning minutes (2 CPU cores)", ylabel=f"{key} (%)", title=f"{task} from scratch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "finetune_protocol.png", dpi=110)


def main() -> None:
    from tools.embedded import EmbeddedConfig

    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="label of this setting in the table and plot")
    p.add_argument("--task", choices=("detection", "segmentation"), default="detection")
    p.add_argument("--detector", default="faster_rcnn")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--data-seed", type=int, default=3)
    p.add_argument("--scale", type=float, nargs=2, default=EmbeddedConfig.scale, metavar=("LOW", "HIGH"),
                   help="object long side / image side of the embedded set (default: the builder's, %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--val-every", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--report-only", action="store_true", help="re-draw the table and plot, train nothing")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "finetune_protocol.json"
    records = json.loads(store.read_text()) if store.is_file() else []
    if not args.report_only:
        record = run(args, extra)
        records = [r for r in records if r["name"] != record["name"]] + [record]
        store.write_text(json.dumps(records, indent=1) + "\n")
        print(json.dumps(record["curve"]))
    write_report(records)


if __name__ == "__main__":
    main()
