#!/usr/bin/env python
"""Lightning overhead of `train.py --method supervised`: the SupervisedModule's training step under
`lightning.Trainer` (with the project's per-step lr schedule callback and the base class's loss logging)
against a plain PyTorch loop doing the same work on the same model, batches and optimizer:

    plain loop:  set the scheduled lr; loss = module.compute_losses(batch)["loss"]; zero_grad; backward; step

Both consume the same in-memory batches through the same DataLoader (the augmentation is excluded: it is
identical in both and would only dilute the difference). Rounds alternate plain / Lightning so that a
change of load on the shared machine hits both; each round times `--steps` steps after `--warmup` steps.
The ratio is taken on process CPU time (robust on a shared machine) and reported on wall time too.

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

from callbacks.lr_schedule import WarmupCosineLR, scheduled_lr  # noqa: E402
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
    """Starts the clocks before optimizer step `start` and stops them after the last one."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.t0 = self.c0 = self.wall = self.cpu = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def run_lightning(cfg, loader: DataLoader, total: int, warmup: int) -> tuple[float, float]:
    module = fresh_module(cfg)
    clock = Clock(warmup)
    sched = WarmupCosineLR(None, name=str(cfg.schedule.name), warmup_steps=int(cfg.schedule.warmup_steps))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[sched, clock],
                        num_sanity_val_steps=0, limit_val_batches=0, precision=str(cfg.trainer.precision))
    trainer.fit(module, train_dataloaders=loader)
    return clock.wall, clock.cpu


def run_plain(cfg, loader: DataLoader, total: int, warmup: int) -> tuple[float, float]:
    module = fresh_module(cfg)
    module.train()
    optimizer = module.configure_optimizers()
    peak = module.peak_lr
    step, t0, c0 = 0, 0.0, 0.0
    while step < total:
        for batch in loader:
            if step == warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            lr = scheduled_lr(step, base_lr=peak, total_steps=total, warmup_steps=int(cfg.schedule.warmup_steps),
                              name=str(cfg.schedule.name))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = module.compute_losses(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
    return time.perf_counter() - t0, time.process_time() - c0


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
    for r in range(args.rounds):
        plain = run_plain(cfg, loader, total, args.warmup)
        light = run_lightning(cfg, loader, total, args.warmup)
        rounds.append({"plain_wall_s": plain[0], "plain_cpu_s": plain[1], "lightning_wall_s": light[0],
                       "lightning_cpu_s": light[1], "cpu_ratio": light[1] / plain[1], "wall_ratio": light[0] / plain[0]})
        print(f"round {r}: {rounds[-1]}", flush=True)
    cpu_ratio = statistics.median(x["cpu_ratio"] for x in rounds)
    wall_ratio = statistics.median(x["wall_ratio"] for x in rounds)
    per_step = statistics.median(x["plain_cpu_s"] for x in rounds) / args.steps
    result = {"args": vars(args), "rounds": rounds, "median_cpu_ratio": cpu_ratio, "median_wall_ratio": wall_ratio,
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
        "| round | plain CPU s | Lightning CPU s | CPU ratio | plain wall s | Lightning wall s | wall ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, x in enumerate(rounds):
        lines.append(f"| {i} | {x['plain_cpu_s']:.2f} | {x['lightning_cpu_s']:.2f} | {x['cpu_ratio']:.3f} | "
                     f"{x['plain_wall_s']:.2f} | {x['lightning_wall_s']:.2f} | {x['wall_ratio']:.3f} |")
    lines += ["", f"Median Lightning / plain: CPU time {cpu_ratio:.3f} ({100 * (cpu_ratio - 1):+.1f}%), wall time "
              f"{wall_ratio:.3f} ({100 * (wall_ratio - 1):+.1f}%); plain step {1000 * per_step:.0f} ms CPU. "
              f"Target overhead <= 5%: {'met' if result['meets_target'] else 'NOT met'} (on CPU time)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
