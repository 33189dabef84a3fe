#!/usr/bin/env python
"""Bag of Tricks ablation at CPU scale: every row of configs/tricks/ (the paper's Tables 4, 5, 6) trained on
Fashion-MNIST and evaluated by top-1 on (a seeded subset of) its test split.

Each paper-scale row YAML is scaled down the same way (see `cpu_version`): ResNet-50 -> a bottleneck
ResNet with one block per stage (timm resnet26 with layers (1, 1, 1, 1); the B/C/D tweaks and the
stride-on-1x1 "A" variant apply unchanged), 224 px -> 28 px, global batch / `--batch-divisor` (32) with
the paper's lr per image (linear scaling rule: lr 0.1 x batch / 256, for the rows without lr_scaling too;
`--lr-factor` multiplies it), 120 epochs ->
`--epochs` passes over `--train` images, warm-up epochs and the mixup rows' 200 epochs scaled by the same
factor. FP16 -> `--fp16` (default 32-true: bf16 autocast on this CPU measured ~6x slower than fp32, so by
default the FP16 row is not run and is reported as the same run as the row before it; pass
`--fp16 bf16-mixed` to run it). Distillation rows use the t6_2 row's run as the teacher by default (`--teacher-factor 1`; the paper's
teacher is a stronger ResNet-152-D), or a t6_2-recipe run with `--teacher-factor` x the steps.
One seed per row unless --seeds: the spread between seeds of one row (reported when measured) is the
noise floor to read the deltas against.

    python benchmarks/tricks_ablation.py                  # all rows, writes benchmarks/results/tricks_ablation.{json,md}
    python benchmarks/tricks_ablation.py --rows t4_0_baseline t6_2_label_smoothing --train 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cheaplunch.config import load_config  # noqa: E402
from cheaplunch.registry import METHODS  # noqa: E402
from cheaplunch.runner import build_trainer, standard_callbacks  # noqa: E402

TRICKS = REPO / "configs" / "tricks"
PAPER_EPOCHS = 120
SAME_AS = {"t5_a_resnet50": "t4_5_fp16", "t6_0_resnet50d": "t5_d_resnet50d"}
# the row each row's delta is taken against (the paper's tables are cumulative, except that Table 6's
# distillation and mixup rows each add to label smoothing, and its last row adds distillation to mixup)
DELTA_VS = {"t4_1_linear_scaling": "t4_0_baseline", "t4_2_warmup": "t4_1_linear_scaling",
            "t4_3_zero_gamma": "t4_2_warmup", "t4_4_no_bias_decay": "t4_3_zero_gamma", "t4_5_fp16": "t4_4_no_bias_decay",
            "t5_b_resnet50b": "t5_a_resnet50", "t5_c_resnet50c": "t5_b_resnet50b", "t5_d_resnet50d": "t5_c_resnet50c",
            "t6_1_cosine": "t6_0_resnet50d", "t6_2_label_smoothing": "t6_1_cosine", "t6_3_distill": "t6_2_label_smoothing",
            "t6_4_mixup": "t6_2_label_smoothing", "t6_5_distill_mixup": "t6_4_mixup"}
TEACHER_RECIPE = "t6_2_label_smoothing"


def header(path: Path) -> tuple[str, str, str]:
    """(table, row label, paper top-1 text) from the row YAML's first comment line."""
    line = path.read_text().splitlines()[0]
    table = line.split(") ", 1)[1].split(",")[0]
    row = line.split('row "', 1)[1].split('"', 1)[0]
    paper = line.rsplit("(", 1)[1].rstrip(").")
    paper = paper.replace("paper ResNet-50 ImageNet top-1: ", "")
    return table, row, paper if paper.replace(".", "").isdigit() else "n/a"


def cpu_version(row_yaml: Path, args: argparse.Namespace, out: Path, steps_factor: float = 1.0,
                teacher: Path | None = None, seed: int = 0) -> Path:
    """Write the CPU-scale config of a paper-scale row (module docstring) and return its path."""
    row = OmegaConf.load(row_yaml)
    kwargs = dict(row.model.backbone_kwargs or {})
    kwargs["layers"] = [1, 1, 1, 1]
    batch = max(2, int(row.data.batch_size) // args.batch_divisor)
    scale = args.epochs / PAPER_EPOCHS * args.train / batch  # optimizer steps per paper epoch
    warmup = row.schedule.get("warmup_epochs")
    cfg = {
        "seed": seed,
        "model": {"arch": "resnet26", "backbone_kwargs": kwargs},
        "data": {"root": args.data, "source": "fashion_mnist", "batch_size": batch, "image_size": args.image_size,
                 "label_count": args.train, "val_count": args.val, "num_workers": 0, "val_batch_size": 256},
        "trainer": {"max_steps": max(1, round(int(row.trainer.max_epochs) * scale * steps_factor)), "max_epochs": -1,
                    "precision": args.fp16 if str(row.trainer.precision) in ("16-mixed", "bf16-mixed") else "32-true",
                    "limit_val_batches": 0, "accelerator": "cpu", "log_every_n_steps": 50},
        # the paper's lr per image: rows without scaling get lr x batch / paper batch; linear-scaling rows
        # already get lr x batch / 256 from the module (reference_batch_size stays 256)
        "optim": {"lr": float(row.optim.lr) * args.lr_factor * (batch / int(row.data.batch_size)
                                                                if row.optim.lr_scaling == "none" else 1.0)},
        "schedule": {"warmup_epochs": None, "warmup_steps": round(float(warmup) * scale) if warmup else 0},
        "logging": {"logger": "none"},
        "checkpoint": {"every_n_steps": 10**9},
    }
    if teacher is not None:
        cfg["model"]["distill"] = {"teacher": str(teacher)}
    path = out / f"{row_yaml.stem}.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def train_row(row_yaml: Path, cpu_yaml: Path, run_dir: Path) -> dict:
    entry = METHODS["supervised"]
    cfg = load_config(entry.config_path, row_yaml)
    OmegaConf.set_struct(cfg, False)  # the CPU scaling adds backbone kwargs (layers) to the row's
    cfg = OmegaConf.merge(cfg, OmegaConf.load(cpu_yaml))
    OmegaConf.set_struct(cfg, True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = entry.datamodule_class().from_config(cfg)
    module = entry.module_class()(cfg)
    trainer = build_trainer(cfg, run_dir, standard_callbacks(cfg, run_dir, export=False), False)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=datamodule)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainer.save_checkpoint(run_dir / "final.ckpt")
    trainer.limit_val_batches = 1.0
    val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"top1": float(val["val/top1"]), "val_loss": float(val["val/loss"]), "steps": int(trainer.global_step),
            "batch": int(cfg.data.batch_size), "lr": float(module.peak_lr), "warmup_steps": int(cfg.schedule.warmup_steps),
            "precision": str(cfg.trainer.precision), "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "checkpoint": str(run_dir / "final.ckpt")}


def train_teacher(results: dict, args: argparse.Namespace, tmp: Path) -> Path:
    """The distillation teacher: the t6_2 row's own run when it was trained in this session (then the
    teacher is only as strong as the student's recipe without distillation), else trained for
    --teacher-factor x the steps."""
    if TEACHER_RECIPE in results["rows"] and args.teacher_factor == 1.0:
        results["teacher"] = {k: v for k, v in results["rows"][TEACHER_RECIPE].items() if k not in ("table", "row", "paper")}
    else:
        cpu = cpu_version(TRICKS / f"{TEACHER_RECIPE}.yaml", args, tmp, steps_factor=args.teacher_factor)
        results["teacher"] = train_row(TRICKS / f"{TEACHER_RECIPE}.yaml", cpu, tmp / "teacher")
    print(f"teacher: {results['teacher']}", flush=True)
    return Path(results["teacher"]["checkpoint"])


def write_markdown(results: dict, args: argparse.Namespace, path: Path) -> None:
    lines = [
        "# Bag of Tricks ablation at CPU scale (benchmarks/tricks_ablation.py)", "",
        f"Fashion-MNIST: {args.train} seeded training images x {args.epochs} passes, top-1 on {args.val} seeded "
        f"test images; bottleneck ResNet with one block per stage (timm resnet26, layers 1-1-1-1) at {args.image_size} px; "
        f"paper batch / {args.batch_divisor}; FP16 rows in {args.fp16} (rows marked 'same run as' were not re-run). "
        "One seed per row unless stated: differences "
        "smaller than the seed spread below are noise. Paper numbers: ResNet-50 on ImageNet, 120-200 epochs.", "",
        "| row | table | paper top-1 | paper delta | CPU top-1 | CPU delta | delta vs | steps | batch | peak lr | train wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = results["rows"]

    def paper(name: str) -> float | None:
        try:
            return float(rows[name]["paper"])
        except (KeyError, ValueError):
            return None

    for name, r in rows.items():
        if "top1" not in r:
            continue
        ref = DELTA_VS.get(name)
        delta = f"{100 * (r['top1'] - rows[ref]['top1']):+.2f}" if ref in rows and "top1" in rows[ref] else ""
        p_delta = f"{paper(name) - paper(ref):+.2f}" if ref and paper(name) is not None and paper(ref) is not None else ""
        same = f" = {r['same_run_as']}" if r.get("same_run_as") else ""
        lines.append(f"| {name} ({r['row']}){same} | {r['table']} | {r['paper']} | {p_delta} | {100 * r['top1']:.2f} | "
                     f"{delta} | {ref or ''} | {r['steps']} | {r['batch']} | {r['lr']:.3g} | {r['train_wall_s']} |")
    if results.get("teacher"):
        t = results["teacher"]
        lines += ["", f"Teacher for the distillation rows: {TEACHER_RECIPE} recipe, {t['steps']} steps, top-1 {100 * t['top1']:.2f}"
                  + (" (the t6_2 row's own run)." if args.teacher_factor == 1.0 else ".")]
    if results.get("seed_spread"):
        lines += ["", "Seed spread: " + "; ".join(f"{k}: {', '.join(f'{100 * v:.2f}' for v in vs)}"
                                                 for k, vs in results["seed_spread"].items())]
    lines += ["", f"Machine: {results['machine']}. Total wall time {results.get('total_wall_s', '?')} s."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--train", type=int, default=1024, help="training images (seeded subset)")
    parser.add_argument("--val", type=int, default=500, help="test images (seeded subset)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training images for a 120-epoch row")
    parser.add_argument("--rows", nargs="*", help="row names (default: all)")
    parser.add_argument("--batch-divisor", type=int, default=32, help="CPU batch = paper global batch / this")
    parser.add_argument("--fp16", default="32-true", choices=("32-true", "bf16-mixed"),
                        help="precision for the paper's FP16 rows on CPU")
    parser.add_argument("--lr-factor", type=float, default=1.0, help="multiply every row's lr (1 = the paper's lr per image)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--teacher-factor", type=float, default=1.0,
                        help="teacher steps / row steps; 1 = reuse the t6_2 row's run as the teacher")
    parser.add_argument("--seeds", type=int, default=1, help="seeds for the first row (noise estimate)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tricks_ablation"))
    parser.add_argument("--render", metavar="JSON", help="only re-write the markdown table of a results JSON")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        args = argparse.Namespace(**{**vars(args), **results["args"]})
        for r in results["rows"].values():
            r["paper"] = r["paper"] if r["paper"].replace(".", "").isdigit() else "n/a"
        write_markdown(results, args, Path(args.render).with_suffix(".md"))
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    names = args.rows or sorted(p.stem for p in TRICKS.glob("*.yaml"))
    results: dict = {"args": vars(args), "rows": {}, "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}"}
    out = Path(args.out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = None
        for name in names:
            table, row, paper = header(TRICKS / f"{name}.yaml")
            same = dict(SAME_AS, **({"t4_5_fp16": "t4_4_no_bias_decay"} if args.fp16 == "32-true" else {}))
            if name in same and same[name] in results["rows"]:
                results["rows"][name] = {**results["rows"][same[name]], "table": table, "row": row, "paper": paper,
                                         "same_run_as": same[name]}
                continue
            if "distill" in name and teacher is None:
                teacher = train_teacher(results, args, tmp)
            cpu = cpu_version(TRICKS / f"{name}.yaml", args, tmp, teacher=teacher if "distill" in name else None)
            r = train_row(TRICKS / f"{name}.yaml", cpu, tmp / name)
            results["rows"][name] = {"table": table, "row": row, "paper": paper, **r}
            print(f"{name}: {r}", flush=True)
            results["total_wall_s"] = round(time.perf_counter() - start)
            out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(results, args, out.with_suffix(".md"))
        if args.seeds > 1:
            first = names[0]
            spread = [results["rows"][first]["top1"]]
            for seed in range(1, args.seeds):
                cpu = cpu_version(TRICKS / f"{first}.yaml", args, tmp, seed=seed)
                spread.append(train_row(TRICKS / f"{first}.yaml", cpu, tmp / f"{first}_seed{seed}")["top1"])
            results["seed_spread"] = {first: spread}
    results["total_wall_s"] = round(time.perf_counter() - start)
    for r in results["rows"].values():
        r.pop("checkpoint", None)
    if results.get("teacher"):
        results["teacher"].pop("checkpoint", None)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
