#!/usr/bin/env python
"""Lightning overhead of `train.py --method supervised`: the SupervisedModule's training step under
`lightning.Trainer` (with the project's per-step lr schedule callback and the base class's loss logging)
against a plain PyTorch loop doing the same work on the same model, batches and optimizer:

    plain loop:  set the scheduled lr; loss = module.compute_losses(batch)["loss"]; zero_grad; backward; step

Both consume the same in-memory batches through the same DataLoader (the augmentation is excluded: it is
identical in both and would only dilute the difference). Rounds alternate the order plain / Lightning so
that a change of load on the shared machine hits both; each round times `--steps` steps after `--warmup`.
Every step is timed (process CPU time and wall time between consecutive batch starts); the ratio is that
of the median step times, which resists the interference of other jobs on a shared machine.

    python benchmarks/lightning_overhead.py        # writes benchmarks/results/lightning_overhead.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from callbacks.lr_schedule import WarmupCosineLR, timm_scheduler  # noqa: E402
from cheaplunch.config import load_config  # noqa: E402
from cheaplunch.registry import METHODS  # noqa: E402
from datamodules.classification_pretrain import SupervisedBatch  # noqa: E402
from lightning_modules.supervised import SupervisedModule  # noqa: E402


def make_batches(n: int, batch: int, size: int, classes: int) -> list[SupervisedBatch]:
    g = torch.Generator().manual_seed(0)
    return [SupervisedBatch(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g),
                            torch.arange(batch)) for _ in range(n)]


def fresh_module(cfg) -> SupervisedModule:
    torch.manual_seed(0)
    module = SupervisedModule(cfg)
    module.configure_model()
    return module


class Clock(L.Callback):
    """Process-CPU and wall timestamps at the start of every training batch and at the end of training;
    the differences are whole steps (data fetch, hooks, logging, forward, backward, optimizer)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def tick(self) -> None:
        self.cpu.append(time.process_time())
        self.wall.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tick()

    def on_train_end(self, trainer, pl_module) -> None:
        self.tick()

    def steps(self, skip: int) -> tuple[list[float], list[float]]:
        """Per-step (CPU, wall) durations after the first `skip` steps."""
        diff = lambda t: [b - a for a, b in zip(t[:-1], t[1:])][skip:]  # noqa: E731
        return diff(self.cpu), diff(self.wall)


def run_lightning(cfg, loader: DataLoader, total: int, warmup: int) -> tuple[list[float], list[float]]:
    module = fresh_module(cfg)
    clock = Clock()
    sched = WarmupCosineLR(None, name=str(cfg.schedule.name), warmup_steps=int(cfg.schedule.warmup_steps))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[sched, clock],
                        num_sanity_val_steps=0, limit_val_batches=0, precision=str(cfg.trainer.precision))
    trainer.fit(module, train_dataloaders=loader)
    return clock.steps(warmup)


def run_plain(cfg, loader: DataLoader, total: int, warmup: int) -> tuple[list[float], list[float]]:
    module = fresh_module(cfg)
    module.train()
    optimizer = module.configure_optimizers()
    scheduler = timm_scheduler(optimizer, base_lr=module.peak_lr, total_steps=total,
                               warmup_steps=int(cfg.schedule.warmup_steps), name=str(cfg.schedule.name))
    clock = Clock()
    step = 0
    while step < total:
        for batch in loader:
            clock.tick()
            scheduler.step_update(step)
            loss = module.compute_losses(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
    clock.tick()
    return clock.steps(warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18d")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lightning_overhead"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = load_config(METHODS["supervised"].config_path, None, [
        f"model.arch={args.arch}", "model.num_classes=10", f"data.batch_size={args.batch}",
        f"data.image_size={args.image_size}", "model.mixup_alpha=0.2", "schedule.warmup_steps=2"])
    total = args.warmup + args.steps
    loader = DataLoader(make_batches(total, args.batch, args.image_size, 10), batch_size=None, shuffle=False)
    rounds = []
    steps: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in ("plain", "lightning")}
    for r in range(args.rounds):
        for name, fn in (("plain", run_plain), ("lightning", run_lightning)) if r % 2 == 0 else \
                (("lightning", run_lightning), ("plain", run_plain)):
            cpu, wall = fn(cfg, loader, total, args.warmup)
            steps[name]["cpu"] += cpu
            steps[name]["wall"] += wall
        rounds.append({f"{k}_{m}_s": sum(steps[k][m][-args.steps:]) for k in steps for m in ("cpu", "wall")})
        print(f"round {r}: {rounds[-1]}", flush=True)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in steps.items()}
    cpu_ratio = med["lightning"]["cpu"] / med["plain"]["cpu"]
    wall_ratio = med["lightning"]["wall"] / med["plain"]["wall"]
    total_ratio = sum(steps["lightning"]["cpu"]) / sum(steps["plain"]["cpu"])
    per_step = med["plain"]["cpu"]
    result = {"args": vars(args), "rounds": rounds, "median_step_s": med, "median_cpu_ratio": cpu_ratio,
              "median_wall_ratio": wall_ratio, "total_cpu_ratio": total_ratio,
              "plain_cpu_s_per_step": per_step, "target_overhead": 0.05, "meets_target": cpu_ratio <= 1.05,
              "machine": f"{os.cpu_count()} CPU cores shared with other developers, {args.threads} torch thread(s), "
                         f"torch {torch.__version__}, lightning {L.__version__}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Lightning overhead of the supervised training step (benchmarks/lightning_overhead.py)", "",
        f"{args.arch}, {args.image_size} px, batch {args.batch}, mixup + label smoothing, Nesterov SGD with a per-step "
        f"lr; {args.rounds} alternating rounds of {args.steps} timed steps (after {args.warmup} untimed); {result['machine']}.", "",
        "| round | plain CPU s | Lightning CPU s | plain wall s | Lightning wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, x in enumerate(rounds):
        lines.append(f"| {i} | {x['plain_cpu_s']:.2f} | {x['lightning_cpu_s']:.2f} | {x['plain_wall_s']:.2f} | "
                     f"{x['lightning_wall_s']:.2f} |")
    lines += ["", f"Median step, Lightning / plain: CPU time {cpu_ratio:.3f} ({100 * (cpu_ratio - 1):+.1f}%), wall time "
              f"{wall_ratio:.3f} ({100 * (wall_ratio - 1):+.1f}%); total CPU time ratio {total_ratio:.3f}. Plain step "
              f"{1000 * per_step:.0f} ms CPU (median). Target overhead <= 5%: "
              f"{'met' if result['meets_target'] else 'NOT met'} (median step CPU time; the median resists the "
              "interference of other developers' jobs on this shared machine, the totals do not)."]
    if cpu_ratio < 1:
        lines.append("A ratio below 1 does not mean Lightning is faster: the difference is below this machine's "
                     "round-to-round noise (compare the rounds above).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
