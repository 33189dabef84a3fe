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

Every run also records the mean |gamma| of each residual block's last BN before and after training and the
share of input pixels the backbone's output depends on at initialisation (`input_support`: with zero-gamma
and strided 1x1 shortcuts, a 28 px input is seen only through its top-left corner at first).

`--update` re-runs the given rows of an existing results file in place (same protocol, other rows kept;
with --variant: keeps the runs of that file with the same variant, row, changes and seed, runs the rest);
`--notes FILE` puts a markdown text under the table. `--variant LABEL ROW KEY=VALUE ...` (repeatable)
runs controlled experiments instead: the row's CPU-scale config with the given config keys changed, for
every seed of `--seed-list` (or of a `seeds=0,1,2` item of that variant), into a table of its own.

    python benchmarks/tricks_ablation.py                  # all rows, writes benchmarks/results/tricks_ablation.{json,md}
    python benchmarks/tricks_ablation.py --rows t4_0_baseline t6_2_label_smoothing --train 2048
    python benchmarks/tricks_ablation.py --variant timm-init t4_3_zero_gamma model.init=timm --seed-list 0 1 \
        --out benchmarks/results/tricks_ablation_zero_gamma
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from models.tricks import last_block_norms  # noqa: E402

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
                teacher: Path | None = None, seed: int = 0, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the CPU-scale config of a paper-scale row (module docstring), with `overrides` (KEY=VALUE
    config keys, e.g. ``trainer.max_steps=384``) applied last, and return its path."""
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
    conf = OmegaConf.create(cfg)
    if overrides:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
    path = out / f"{row_yaml.stem}.yaml"
    OmegaConf.save(conf, path)
    return path


def last_gamma_abs(backbone: torch.nn.Module) -> list[float]:
    """Mean |gamma| of the last BN of each residual block's branch (the BNs zero-gamma starts at 0)."""
    return [round(float(bn.weight.detach().abs().mean()), 4) for bn in last_block_norms(backbone)]


def input_support(backbone: torch.nn.Module, image_size: int) -> float:
    """Share of input pixels the backbone's output depends on (eval mode, random images): 1.0 for a
    ResNet, less when closed residual branches (zero-gamma) leave only strided 1x1 shortcuts, which keep
    one pixel in four at each downsampling. Touches neither the global RNG nor the parameters' .grad."""
    was_training = backbone.training
    backbone.eval()
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (grad,) = torch.autograd.grad(backbone(x).square().sum(), x)
    backbone.train(was_training)
    return round(float((grad.abs().sum((0, 1)) > 0).float().mean()), 4)


def train_row(row_yaml: Path, cpu_yaml: Path, run_dir: Path) -> dict:
    entry = METHODS["supervised"]
    cfg = load_config(entry.config_path, row_yaml)
    OmegaConf.set_struct(cfg, False)  # the CPU scaling adds backbone kwargs (layers) to the row's
    cfg = OmegaConf.merge(cfg, OmegaConf.load(cpu_yaml))
    OmegaConf.set_struct(cfg, True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = entry.datamodule_class()(cfg)
    module = entry.module_class()(cfg)
    trainer = build_trainer(cfg, run_dir, standard_callbacks(cfg, run_dir, export=False), False)
    init_gamma, support = last_gamma_abs(module.backbone), input_support(module.backbone, int(cfg.data.image_size))
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=datamodule)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainer.save_checkpoint(run_dir / "final.ckpt")
    trainer.limit_val_batches = 1.0
    val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"top1": float(val["val/top1"]), "val_loss": float(val["val/loss"]), "steps": int(trainer.global_step),
            "batch": int(cfg.data.batch_size), "lr": float(module.peak_lr), "warmup_steps": int(cfg.schedule.warmup_steps),
            "precision": str(cfg.trainer.precision), "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "input_support": support, "last_gamma_abs_init": init_gamma, "last_gamma_abs": last_gamma_abs(module.backbone),
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


def command_line(args: argparse.Namespace | dict) -> str:
    """The command that reproduces a results file: the options whose values differ from the defaults."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    parts = ["python benchmarks/tricks_ablation.py"]
    for action in build_parser()._actions:
        key = action.dest
        if key in ("help", "render", "notes", "update") or key not in values or values[key] == action.default:
            continue
        flag, value = action.option_strings[-1], values[key]
        if key == "variant":
            parts += [f"{flag} {shlex.join(v)}" for v in value]
        elif isinstance(value, list):
            parts.append(f"{flag} {shlex.join(str(v) for v in value)}")
        elif value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def protocol(args: argparse.Namespace) -> str:
    return (f"Fashion-MNIST: {args.train} seeded training images x {args.epochs} passes, top-1 on {args.val} seeded "
            f"test images; bottleneck ResNet with one block per stage (timm resnet26, layers 1-1-1-1) at {args.image_size} px; "
            f"paper batch / {args.batch_divisor}")


def footer(results: dict) -> list[str]:
    lines = []
    if results.get("notes"):
        lines += ["", results["notes"].strip()]
    lines += ["", f"Command: `{results.get('command') or command_line(results['args'])}`"]
    for rerun in results.get("reruns", []):
        lines.append(f"Re-run of {', '.join(rerun['rows'])} ({rerun['wall_s']} s): `{rerun['command']}`")
    lines += ["", f"Machine: {results['machine']}. Total wall time {results.get('total_wall_s', '?')} s."]
    return lines


def write_markdown(results: dict, args: argparse.Namespace, path: Path) -> None:
    lines = [
        "# Bag of Tricks ablation at CPU scale (benchmarks/tricks_ablation.py)", "",
        f"{protocol(args)}; FP16 rows in {args.fp16} (rows marked 'same run as' were not re-run). "
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
    path.write_text("\n".join(lines + footer(results)) + "\n")


def write_variants_markdown(results: dict, args: argparse.Namespace, path: Path) -> None:
    lines = [
        "# Bag of Tricks ablation at CPU scale: controlled experiments (benchmarks/tricks_ablation.py --variant)", "",
        f"{protocol(args)}. Each variant is the named row's CPU-scale config with only the listed config keys "
        "changed. Last-BN |gamma|: mean |gamma| of each residual block's last BN after training (layer1..layer4, "
        "mean over seeds; zero-gamma starts them at 0). Input support: share of input pixels the backbone's "
        "output depends on at initialisation.", "",
        "| variant | row | changed | steps | seeds | top-1 per seed | mean top-1 | last-BN abs(gamma) after | input support at init | train wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, v in results["variants"].items():
        runs = v["runs"]
        if not runs:
            continue
        top1 = [100 * r["top1"] for r in runs]
        gammas = [sum(g) / len(runs) for g in zip(*(r["last_gamma_abs"] for r in runs))]
        lines.append(f"| {label} | {v['row']} | {', '.join(v['overrides']) or '(none)'} | {runs[0]['steps']} | "
                     f"{', '.join(str(r['seed']) for r in runs)} | {', '.join(f'{t:.1f}' for t in top1)} | "
                     f"{sum(top1) / len(top1):.1f} | {' / '.join(f'{g:.3f}' for g in gammas)} | "
                     f"{runs[0]['input_support']:.3f} | {sum(r['train_wall_s'] for r in runs):.0f} |")
    path.write_text("\n".join(lines + footer(results)) + "\n")


def run_variants(args: argparse.Namespace, out: Path) -> dict:
    """Controlled experiments: each --variant LABEL ROW KEY=VALUE... for each seed of --seed-list."""
    results: dict = {"args": vars(args), "command": command_line(args), "variants": {},
                     "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}"}
    done: dict = {}
    previous_wall = 0
    if args.update and out.with_suffix(".json").is_file():
        previous = json.loads(out.with_suffix(".json").read_text())
        check_protocol(previous["args"], args, out)
        done = {(label, v["row"], tuple(v["overrides"]), r["seed"]): r
                for label, v in previous.get("variants", {}).items() for r in v["runs"]}
        previous_wall = int(previous.get("total_wall_s", 0))  # the sessions that ran the kept runs
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, row, *overrides in args.variant:
            seeds = [int(x) for o in overrides if o.startswith("seeds=") for x in o[6:].split(",")] or args.seed_list
            overrides = [o for o in overrides if not o.startswith("seeds=")]
            if not (TRICKS / f"{row}.yaml").is_file():
                raise SystemExit(f"--variant {label}: no row {row} in {TRICKS}")
            if "distill" in row:
                raise SystemExit(f"--variant {label}: distillation rows need a teacher; not supported here")
            entry = results["variants"][label] = {"row": row, "overrides": overrides, "runs": []}
            for seed in seeds:
                if (label, row, tuple(overrides), seed) in done:
                    entry["runs"].append(done[(label, row, tuple(overrides), seed)])
                    continue
                cpu = cpu_version(TRICKS / f"{row}.yaml", args, tmp, seed=seed, overrides=overrides)
                r = train_row(TRICKS / f"{row}.yaml", cpu, tmp / f"{label}_seed{seed}")
                r.pop("checkpoint")
                entry["runs"].append({"seed": seed, **r})
                print(f"{label} seed {seed}: {r}", flush=True)
                results["total_wall_s"] = previous_wall + round(time.perf_counter() - start)
                out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
                write_variants_markdown(results, args, out.with_suffix(".md"))
    results["total_wall_s"] = previous_wall + round(time.perf_counter() - start)
    return results


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--update", action="store_true",
                        help="re-run --rows into the existing --out results (same protocol), keeping the other rows")
    parser.add_argument("--notes", metavar="MD", help="markdown file whose text goes under the table (kept in the JSON)")
    parser.add_argument("--variant", nargs="+", action="append", metavar="LABEL ROW KEY=VALUE",
                        help="a controlled experiment: ROW's CPU-scale config with KEY=VALUE config keys changed (repeatable)")
    parser.add_argument("--seed-list", type=int, nargs="+", default=[0],
                        help="seeds of every --variant without its own seeds=S1,S2,... item")
    return parser


PROTOCOL_KEYS = ("data", "train", "val", "epochs", "batch_divisor", "fp16", "lr_factor", "image_size", "teacher_factor")


def check_protocol(stored: dict, args: argparse.Namespace, out: Path) -> None:
    differ = {k: (stored.get(k), getattr(args, k)) for k in PROTOCOL_KEYS if stored.get(k) != getattr(args, k)}
    if differ:
        raise SystemExit(f"--update: the protocol differs from {out.with_suffix('.json')} (stored, given): {differ}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else None
    if args.render:
        source = Path(args.render)
        results = json.loads(source.read_text())
        args = argparse.Namespace(**{**vars(args), **results["args"]})  # the stored run's protocol
        if notes is not None:
            results["notes"] = notes
            source.write_text(json.dumps(results, indent=2) + "\n")
        if "variants" in results:
            write_variants_markdown(results, args, source.with_suffix(".md"))
            return 0
        for r in results["rows"].values():
            r["paper"] = r["paper"] if r["paper"].replace(".", "").isdigit() else "n/a"
        write_markdown(results, args, source.with_suffix(".md"))
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.variant:
        if any(len(v) < 2 or any("=" not in o for o in v[2:]) for v in args.variant):
            raise SystemExit("--variant takes LABEL ROW [KEY=VALUE ...]")
        results = run_variants(args, out)
        if notes is not None:
            results["notes"] = notes
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        write_variants_markdown(results, args, out.with_suffix(".md"))
        print(out.with_suffix(".md").read_text())
        return 0
    names = args.rows or sorted(p.stem for p in TRICKS.glob("*.yaml"))
    results: dict = {"args": vars(args), "rows": {}, "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}"}
    previous_wall = 0
    if args.update:
        if not args.rows:
            raise SystemExit("--update re-runs the rows named by --rows")
        results = json.loads(out.with_suffix(".json").read_text())
        stored = results["args"]
        check_protocol(stored, args, out)
        if any("distill" in n for n in names) and args.teacher_factor != 1.0:
            raise SystemExit("--update of distillation rows with a separate teacher is not supported; re-run all rows")
        results.setdefault("command", command_line(stored))
        previous_wall = int(results.get("total_wall_s", 0))
        for name in names:  # the previous result of a re-run row, for the record
            if name in results["rows"]:
                results["rows"][name]["previous_top1"] = results["rows"][name].get("previous_top1", results["rows"][name]["top1"])
    if notes is not None:
        results["notes"] = notes
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = None
        for name in names:
            table, row, paper = header(TRICKS / f"{name}.yaml")
            same = dict(SAME_AS, **({"t4_5_fp16": "t4_4_no_bias_decay"} if args.fp16 == "32-true" else {}))
            if name in same and same[name] in results["rows"]:
                kept = {k: v for k, v in results["rows"].get(name, {}).items() if k == "previous_top1"}
                results["rows"][name] = {**results["rows"][same[name]], "table": table, "row": row, "paper": paper,
                                         "same_run_as": same[name], **kept}
                continue
            if "distill" in name and teacher is None:
                teacher = train_teacher(results, args, tmp)
            cpu = cpu_version(TRICKS / f"{name}.yaml", args, tmp, teacher=teacher if "distill" in name else None)
            r = train_row(TRICKS / f"{name}.yaml", cpu, tmp / name)
            kept = {k: v for k, v in results["rows"].get(name, {}).items() if k == "previous_top1"}
            results["rows"][name] = {"table": table, "row": row, "paper": paper, **r, **kept}
            print(f"{name}: {r}", flush=True)
            results["total_wall_s"] = previous_wall + round(time.perf_counter() - start)
            out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(results, args, out.with_suffix(".md"))
        if args.seeds > 1:
            first = names[0]
            spread = [results["rows"][first]["top1"]]
            for seed in range(1, args.seeds):
                cpu = cpu_version(TRICKS / f"{first}.yaml", args, tmp, seed=seed)
                spread.append(train_row(TRICKS / f"{first}.yaml", cpu, tmp / f"{first}_seed{seed}")["top1"])
            results["seed_spread"] = {first: spread}
    results["total_wall_s"] = previous_wall + round(time.perf_counter() - start)
    if args.update:
        results.setdefault("reruns", []).append({"rows": names, "wall_s": round(time.perf_counter() - start),
                                                 "command": command_line(args) + " --update"})
    else:
        results["command"] = command_line(args)
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
