"""Cost of one ERF weight refresh, as a multiple of one Montage training step, and vs the plain loop.

All in one process with a fixed thread count (``torch.set_num_threads``), so that the ratios share
the machine's load (it is shared and noisy; absolute times are not comparable across runs):

- training step: forward + backward + SGD (momentum 0.9, wd 1e-4) step in train mode of a timm backbone
  (``num_classes=0, global_pool=""``) + ``DenseClassifier`` with the ERF-adaptive dense loss, on random
  montages of ``--image-size``; for each ``--train-archs`` at ``--batch``, timed in two groups of
  ``--repeats`` (before and after the ERF timings, to bracket load changes), median reported. Also once
  for ``--arch`` at ``--paper-batch`` (the paper's per-GPU batch: 512 montages on 8 GPUs = 64).
- ERF refresh: ``compute_erf`` of ``--arch`` on ``--montages`` random montages (eval mode), for each of
  ``--methods`` ("loop", "vmap" = is_grads_batched, "func" = torch.func.vmap; "auto" picks "loop" on
  CPU and "func" on CUDA), then ``soft_label_weights``; timed once each.
- brute force: ``compute_erf_bruteforce`` (one ``autograd.grad`` per feature position) on
  ``--bf-montages`` montages, scaled linearly to ``--montages`` if fewer (stated in the output). It is
  the same algorithm as method "loop": the two rows also show the run-to-run noise.

Usage: ``.venv/bin/python benchmarks/erf_refresh.py --arch resnet18 --image-size 224 --batch 8
--montages 4 --repeats 3``; writes benchmarks/results/erf_refresh.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.erf import METHODS, compute_erf, compute_erf_bruteforce, resolve_method, soft_label_weights  # noqa: E402
from models.heads import DenseClassifier  # noqa: E402
from models.layout import MontageLayout  # noqa: E402
from models.montage_losses import erf_dense_loss  # noqa: E402

NUM_CLASSES = 11  # 10 object classes + background, as the embedded dataset


class Net(nn.Module):
    """Backbone feature map -> dense logits."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
        self.head = DenseClassifier(self.backbone.num_features, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _train_step_fn(
    net: Net, batch: int, size: int, layout: MontageLayout, device: torch.device
) -> Callable[[], None]:
    g = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch, 4), generator=g).to(device)
    with torch.no_grad():
        fh, fw = net.backbone(images[:1]).shape[-2:]
    regions = layout.position_regions((fh, fw))
    weights = 0.7 * F.one_hot(regions, 4).float() + 0.075  # a fixed soft target, as after a refresh
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        net.train()
        loss, _ = erf_dense_loss(net(images), labels, weights, regions)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", help="backbone whose ERF is refreshed")
    p.add_argument("--train-archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="training batch for the step timings")
    p.add_argument("--paper-batch", type=int, default=64, help="per-GPU paper batch (512 / 8); 0 skips")
    p.add_argument("--montages", type=int, default=4, help="montages averaged in one ERF refresh")
    p.add_argument("--bf-montages", type=int, default=None, help="montages for brute force (default all)")
    p.add_argument("--methods", nargs="+", default=["auto", "vmap", "func"], choices=METHODS)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="training steps timed per group (2 groups)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "erf_refresh")
    args = p.parse_args(argv)
    bf_montages = args.bf_montages or args.montages

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{env}.venv/bin/python benchmarks/erf_refresh.py {shlex.join(sys.argv[1:] if argv is None else argv)}"
    layout = MontageLayout((args.image_size, args.image_size))
    load_start = os.getloadavg()
    t_all = time.perf_counter()

    nets = {arch: Net(arch).to(device) for arch in dict.fromkeys([*args.train_archs, args.arch])}
    steps = {
        arch: _train_step_fn(nets[arch], args.batch, args.image_size, layout, device)
        for arch in args.train_archs
    }
    step_times: dict[str, list[float]] = {arch: [] for arch in args.train_archs}
    for arch in args.train_archs:  # warm-up (lazy init, allocator, oneDNN primitives)
        steps[arch]()
    erf_images = torch.randn(args.montages, 3, args.image_size, args.image_size).to(device)
    masks = layout.region_masks().to(device)
    backbone = nets[args.arch].backbone
    compute_erf(backbone, erf_images[:1, :, :64, :64])  # warm-up of the autograd/vmap path
    with torch.no_grad():  # and of an eval forward at the refresh's shape
        backbone.eval()
        backbone(erf_images)
        backbone.train()

    def time_steps() -> None:
        for _ in range(args.repeats):
            for arch in args.train_archs:
                step_times[arch].append(_timed(steps[arch], device))

    time_steps()
    erf_times: dict[str, float] = {}
    for method in args.methods:

        def refresh(method: str = method) -> None:
            erf = compute_erf(backbone, erf_images, method=method)
            soft_label_weights(erf, masks, tau=0.7)

        label = method if method != "auto" else f"auto={resolve_method(method, device)}"
        erf_times[label] = _timed(refresh, device)
    bf_measured = _timed(lambda: compute_erf_bruteforce(backbone, erf_images[:bf_montages]), device)
    bf_scaled = bf_measured * args.montages / bf_montages
    time_steps()
    paper_step, paper_times = None, []
    if args.paper_batch:  # a first step at this shape (page faults, primitives), then the timed one
        paper_fn = _train_step_fn(nets[args.arch], args.paper_batch, args.image_size, layout, device)
        paper_times = [_timed(paper_fn, device), _timed(paper_fn, device)]
        paper_step = paper_times[-1]
    with torch.no_grad():
        fh, fw = backbone(erf_images[:1]).shape[-2:]

    step_med = {arch: statistics.median(t) for arch, t in step_times.items()}
    ref_step = step_med.get(args.arch)
    result = {
        "command": command,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "total_seconds": time.perf_counter() - t_all,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "feature_hw": [fh, fw],
        "backward_passes_per_refresh": args.montages * fh * fw,
        "train_step_seconds": step_times,
        "train_step_median": step_med,
        "paper_batch_step_seconds": paper_step,
        "paper_batch_step_seconds_incl_first": paper_times,
        "erf_refresh_seconds": erf_times,
        "bruteforce_seconds_measured": bf_measured,
        "bruteforce_montages": bf_montages,
        "bruteforce_seconds_scaled": bf_scaled,
        "refresh_in_steps": {m: t / ref_step for m, t in erf_times.items()} if ref_step else None,
        "refresh_in_paper_batch_steps": {m: t / paper_step for m, t in erf_times.items()}
        if paper_step
        else None,
        "speedup_vs_bruteforce": {m: bf_scaled / t for m, t in erf_times.items()},
        "auto_method": resolve_method("auto", device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    a = r["args"]
    size, arch = a["image_size"], a["arch"]
    lines = [
        "# ERF refresh cost",
        "",
        "```",
        r["command"],
        "```",
        "",
        f"torch {r['torch']}, timm {r['timm']}, device {r['device']}; CPU ({r['cpu']}, {r['cpu_count']} cores "
        f"shared with other developers), `torch.set_num_threads({r['threads']})`; load average "
        f"{r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} at end; "
        f"{r['total_seconds']:.0f} s in all. Random weights and random {size}x{size} montages (timing only).",
        "",
        "## Training step (forward + backward + SGD step, train mode, backbone + 1x1 dense head, ERF-dense loss)",
        "",
        "| backbone | batch | median s/step | all timings (s) |",
        "|---|---|---|---|",
    ]
    for net, times in r["train_step_seconds"].items():
        lines.append(
            f"| {net} | {a['batch']} | {r['train_step_median'][net]:.2f} | {', '.join(f'{t:.2f}' for t in times)} |"
        )
    if r["paper_batch_step_seconds"]:
        lines.append(
            f"| {arch} | {a['paper_batch']} (paper per-GPU) | {r['paper_batch_step_seconds']:.2f} | "
            f"second step; first at this shape {r['paper_batch_step_seconds_incl_first'][0]:.2f} |"
        )
    fh, fw = r["feature_hw"]
    lines += [
        "",
        f"## ERF refresh of {arch} ({a['montages']} montages, feature map {fh}x{fw} = "
        f"{fh * fw} positions, i.e. {r['backward_passes_per_refresh']} image-position input-gradient passes)",
        "",
        f"| method | refresh s | x {arch} step (batch {a['batch']}) | "
        + (f"x {arch} step (batch {a['paper_batch']}) | " if r["refresh_in_paper_batch_steps"] else "")
        + "speed-up vs brute force |",
        "|---|---|---|" + ("---|" if r["refresh_in_paper_batch_steps"] else "") + "---|",
    ]
    for m, t in r["erf_refresh_seconds"].items():
        row = f"| compute_erf(method={m!r}) | {t:.1f} | "
        row += f"{r['refresh_in_steps'][m]:.1f} | " if r["refresh_in_steps"] else "n/a | "
        if r["refresh_in_paper_batch_steps"]:
            row += f"{r['refresh_in_paper_batch_steps'][m]:.2f} | "
        row += f"{r['speedup_vs_bruteforce'][m]:.2f}x |"
        lines.append(row)
    bf_note = (
        ""
        if r["bruteforce_montages"] == a["montages"]
        else f" (measured on {r['bruteforce_montages']} montages: {r['bruteforce_seconds_measured']:.1f} s, "
        f"scaled x{a['montages'] / r['bruteforce_montages']:g})"
    )
    lines.append(
        f"| compute_erf_bruteforce (loop) | {r['bruteforce_seconds_scaled']:.1f}{bf_note} | "
        + (
            f"{r['bruteforce_seconds_scaled'] / r['train_step_median'][arch]:.1f} | "
            if r["refresh_in_steps"]
            else "n/a | "
        )
        + (
            f"{r['bruteforce_seconds_scaled'] / r['paper_batch_step_seconds']:.2f} | "
            if r["refresh_in_paper_batch_steps"]
            else ""
        )
        + "1.00x |"
    )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
