#!/usr/bin/env python
"""Label efficiency of label-based pixel contrastive pre-training (Zhao et al., ICCV 2021) on the
embedded dataset at small resolution: at each labelled fraction F, with the SAME total number of
optimizer steps,

- ``scratch``: cross-entropy fine-tuning (DeepLabV3 on resnet18) from random init for PRE + FT steps;
- ``contrastive``: ``train.py --method contrastive`` on the same labelled subset for PRE steps, then
  ``finetune.py --task segmentation --backbone <run>`` for FT steps (same config as scratch otherwise);
  the fine-tuning starts backbone and DeepLab decoder (ASPP + 3x3 conv/BN) from the pre-training, only the
  projection head is dropped and the 1x1 classifier is new.

Both see only the labelled subset (``--label-fraction F``, nested and seeded, shared by the two stages),
with the same seed, crop size and fine-tuning schedule shape (warm-up + cosine over its own steps).
mIoU on the full val split (dataset-level confusion matrix). Outputs in ``--results``:
``contrastive_label_efficiency.{md,json,png}``. Finished runs (results.json present) are reused.

    python benchmarks/contrastive_label_efficiency.py --fractions 0.1 0.3 1.0 --pre-steps 150 --ft-steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        fh.write(shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--pre-steps", type=int, default=150, help="contrastive pre-training steps")
    p.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps after pre-training")
    p.add_argument("--size", type=int, default=64, help="crop size = short side (train and val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="dataset (default: the embedded one)")
    p.add_argument("--runs", default=str(REPO / "runs" / "label_efficiency"))
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--pre-override", action="append", default=[], metavar="key=value",
                   help="extra override for the contrastive pre-training runs")
    p.add_argument("--ft-override", action="append", default=[], metavar="key=value",
                   help="extra override for every fine-tuning run (scratch and after pre-training)")
    args = p.parse_args()

    py = sys.executable
    total = args.pre_steps + args.ft_steps
    s = args.size
    common = ["--logger", "csv", "--seed", str(args.seed), "trainer.accelerator=cpu", f"data.base_size={s}",
              f"data.crop_size={s}", f"data.batch_size={args.batch_size}", "data.num_workers=1"]
    if args.data:
        common = ["--data", args.data, *common]
    ft_common = [*common, f"data.val_size={s}", "data.val_batch_size=16", "trainer.log_every_n_steps=10",
                 *args.ft_override]
    runs = Path(args.runs)
    rows = []
    for frac in args.fractions:
        tag = f"f{frac:g}"
        row: dict = {"fraction": frac}
        # CE from scratch, PRE + FT steps
        out = runs / tag / "scratch"
        if not (out / "results.json").is_file():
            row["scratch_s"] = _run([py, "finetune.py", "--task", "segmentation", "--backbone", "scratch", "--arch",
                                     args.arch, "--out", str(out), "--label-fraction", str(frac), *ft_common,
                                     f"trainer.max_steps={total}", f"trainer.val_check_interval={max(total // 4, 1)}"],
                                    runs / tag / "scratch.log")
        res = json.loads((out / "results.json").read_text())
        row["scratch"], row["scratch_per_class"] = res["mIoU"], res["per_class_IoU"]
        row["scratch_history"] = json.loads((out / "history.json").read_text())
        # contrastive pre-training on the labelled subset, then FT steps of fine-tuning
        pre = runs / tag / "contrastive_pre"
        if not (pre / "backbone.pt").is_file():
            row["pre_s"] = _run([py, "train.py", "--method", "contrastive", "--out", str(pre), *common,
                                 f"model.arch={args.arch}", f"data.label_fraction={frac}",
                                 f"trainer.max_steps={args.pre_steps}", "logging.images_every_n_steps=0",
                                 "trainer.log_every_n_steps=10", *args.pre_override], runs / tag / "pre.log")
        out = runs / tag / "contrastive"
        if not (out / "results.json").is_file():
            row["ft_s"] = _run([py, "finetune.py", "--task", "segmentation", "--backbone", str(pre / "backbone.pt"),
                                "--out", str(out), "--label-fraction", str(frac), *ft_common,
                                f"trainer.max_steps={args.ft_steps}",
                                f"trainer.val_check_interval={max(args.ft_steps // 2, 1)}"], runs / tag / "ft.log")
        res = json.loads((out / "results.json").read_text())
        row["contrastive"], row["contrastive_per_class"] = res["mIoU"], res["per_class_IoU"]
        row["contrastive_history"] = json.loads((out / "history.json").read_text())
        row["labelled_images"] = _count_labelled(runs / tag / "scratch" / "config.yaml")
        row["pre_loss"] = _first_last_loss(pre / "csv" / "metrics.csv")
        rows.append(row)
        print(f"fraction {frac}: scratch mIoU {row['scratch']:.4f}  contrastive+ft mIoU {row['contrastive']:.4f}",
              flush=True)

    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    meta = {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "arch": args.arch, "size": s,
            "batch_size": args.batch_size, "pre_steps": args.pre_steps, "ft_steps": args.ft_steps,
            "total_steps": total, "seed": args.seed, "pre_overrides": args.pre_override,
            "ft_overrides": args.ft_override}
    (res / "contrastive_label_efficiency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _markdown(res / "contrastive_label_efficiency.md", rows, meta)
    _plot(res / "contrastive_label_efficiency.png", rows, meta)


def _first_last_loss(metrics_csv: Path) -> list[float] | None:
    """[first, last] logged train/loss of a run (CSV logger), or None."""
    import csv

    try:
        with metrics_csv.open() as fh:
            losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    except (OSError, KeyError, ValueError):
        return None
    return [losses[0], losses[-1]] if losses else None


def _count_labelled(config_yaml: Path) -> int | None:
    from omegaconf import OmegaConf

    from datamodules.finetune_common import labelled_subset

    try:
        cfg = OmegaConf.load(config_yaml)
        root = Path(cfg.data.root) if cfg.data.root else REPO / "data" / "embedded"
        n = len(list((root / "images" / "train").iterdir()))
        return len(labelled_subset(n, cfg.data.label_fraction, cfg.data.label_count, int(cfg.data.subset_seed)))
    except Exception:  # noqa: BLE001 - informative only
        return None


def _markdown(path: Path, rows: list[dict], meta: dict) -> None:
    lines = [
        "# Label efficiency: contrastive pre-training + fine-tuning vs cross-entropy from scratch", "",
        f"`{meta['command']}`", "",
        f"{meta['arch']} (DeepLabV3 head, output stride 16), {meta['size']} px crops, batch {meta['batch_size']}, "
        f"seed {meta['seed']}, CPU. Same total budget of {meta['total_steps']} optimizer steps per row: scratch = "
        f"{meta['total_steps']} fine-tuning steps; contrastive = {meta['pre_steps']} pre-training steps on the "
        f"labelled subset + {meta['ft_steps']} fine-tuning steps, starting backbone and DeepLab decoder (ASPP) "
        "from the pre-training (new 1x1 classifier). Fine-tuning overrides (both arms): "
        f"{' '.join(meta.get('ft_overrides') or []) or 'none'}. mIoU on the whole val split (dataset-level "
        "confusion matrix). One seed: differences of a few points are within run-to-run noise.", "",
        "| labelled fraction | labelled images | CE from scratch mIoU | contrastive + CE mIoU | difference | "
        "classes with IoU > 0.01 (scratch / contrastive) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        learnt = [sum(v > 0.01 for v in r[f"{k}_per_class"].values()) for k in ("scratch", "contrastive")]
        n = len(r["scratch_per_class"])
        lines.append(f"| {r['fraction']:g} | {r.get('labelled_images') or '-'} | {r['scratch']:.4f} | "
                     f"{r['contrastive']:.4f} | {r['contrastive'] - r['scratch']:+.4f} | "
                     f"{learnt[0]} / {learnt[1]} of {n} |")
    bg = [r[f"{k}_per_class"].get("background") for r in rows for k in ("scratch", "contrastive")]
    if all(v is not None for v in bg):
        lines += ["", f"Background IoU ranges {min(bg):.3f}-{max(bg):.3f}. When only the background is found, "
                  f"mIoU is about background IoU / number of classes present: rows near that value have not "
                  "learnt the object classes yet, and their differences say nothing about the pre-training."]
    lines += ["", "Reading it (same seed and fine-tuning schedule shape in both arms):", ""]
    for r in rows:
        at_ft = next((h["metrics"]["mIoU"] for h in r["scratch_history"] if h["step"] == meta["ft_steps"]), None)
        pre = r.get("pre_loss")
        lines.append(
            f"- fraction {r['fraction']:g}: contrastive pre-training loss {pre[0]:.2f} -> {pre[1]:.2f} (first -> last "
            f"logged, {meta['pre_steps']} steps); " if pre else f"- fraction {r['fraction']:g}: ")
        lines[-1] += (f"after {meta['ft_steps']} CE steps scratch had {at_ft:.4f}, the pre-trained arm ends at "
                      f"{r['contrastive']:.4f}." if at_ft is not None else
                      f"scratch ends at {r['scratch']:.4f}, the pre-trained arm at {r['contrastive']:.4f}.")
    lines += ["", "mIoU during fine-tuning (step: value):", ""]
    for r in rows:
        sc = ", ".join(f"{h['step']}: {h['metrics']['mIoU']:.3f}" for h in r["scratch_history"])
        ct = ", ".join(f"{h['step']}: {h['metrics']['mIoU']:.3f}" for h in r["contrastive_history"])
        lines.append(f"- fraction {r['fraction']:g}: scratch [{sc}]; contrastive (after {meta['pre_steps']} "
                     f"pre-training steps) [{ct}]")
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = [r["fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(fr, [r["scratch"] for r in rows], "o-", label=f"CE from scratch ({meta['total_steps']} steps)")
    ax.plot(fr, [r["contrastive"] for r in rows], "s-",
            label=f"contrastive {meta['pre_steps']} + CE {meta['ft_steps']} steps")
    ax.set_xscale("log")
    ax.set_xlabel("labelled fraction of the training set")
    ax.set_ylabel("val mIoU")
    ax.set_title(f"{meta['arch']}, {meta['size']} px, embedded dataset")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
