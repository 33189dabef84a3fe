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
from models.montage_canvas import MontageLayout  # noqa: E402
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


Timing = dict[str, float]  # {"wall": s, "cpu": s}


def _timed(fn: Callable[[], object], device: torch.device) -> Timing:
    """Wall-clock and process CPU time of one call. On a shared CPU with a fixed thread count, CPU time
    is what the computation costs and is far less sensitive to the other processes' load."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


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
    p.add_argument("--clock", choices=["cpu", "wall"], default=None, help="time used for ratios (cpu on CPU)")
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
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    step_times: dict[str, list[Timing]] = {arch: [] for arch in args.train_archs}
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
    erf_times: dict[str, Timing] = {}
    for method in args.methods:

        def refresh(method: str = method) -> None:
            erf = compute_erf(backbone, erf_images, method=method)
            soft_label_weights(erf, masks, tau=0.7)

        label = method if method != "auto" else f"auto={resolve_method(method, device)}"
        erf_times[label] = _timed(refresh, device)
    bf_measured = _timed(lambda: compute_erf_bruteforce(backbone, erf_images[:bf_montages]), device)
    erf_times["bruteforce"] = {k: v * args.montages / bf_montages for k, v in bf_measured.items()}
    time_steps()
    paper_times: list[Timing] = []
    if args.paper_batch:  # a first step at this shape (page faults, primitives), then the timed one
        paper_fn = _train_step_fn(nets[args.arch], args.paper_batch, args.image_size, layout, device)
        paper_times = [_timed(paper_fn, device), _timed(paper_fn, device)]
    with torch.no_grad():
        fh, fw = backbone(erf_images[:1]).shape[-2:]

    def med(ts: list[Timing], key: str) -> float:
        return statistics.median(t[key] for t in ts)

    step_med = {arch: {key: med(ts, key) for key in ("wall", "cpu")} for arch, ts in step_times.items()}
    ref_steps = {}
    if args.arch in step_med:
        ref_steps[f"{args.arch} batch {args.batch}"] = step_med[args.arch][clock]
    if paper_times:
        ref_steps[f"{args.arch} batch {args.paper_batch}"] = paper_times[-1][clock]
    bf = erf_times["bruteforce"][clock]
    result = {
        "command": command,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "clock": clock,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "total_seconds": time.perf_counter() - t_all,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "feature_hw": [fh, fw],
        "backward_passes_per_refresh": args.montages * fh * fw,
        "auto_method": resolve_method("auto", device),
        "train_step_seconds": step_times,
        "train_step_median": step_med,
        "paper_batch_step_seconds": paper_times,  # [first at this shape, timed]
        "erf_refresh_seconds": erf_times,  # "bruteforce" scaled to --montages
        "bruteforce_montages": bf_montages,
        "bruteforce_seconds_measured": bf_measured,
        "refresh_in_steps": {
            ref: {m: t[clock] / step for m, t in erf_times.items()} for ref, step in ref_steps.items()
        },
        "speedup_vs_bruteforce": {m: bf / t[clock] for m, t in erf_times.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    a = r["args"]
    size, arch, clock = a["image_size"], a["arch"], r["clock"]
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
        f"{r['total_seconds']:.0f} s in all. Random weights and random {size}x{size} montages (timing only). "
        f"Ratios use **{clock}** time (process CPU time with a fixed thread count is robust to the other "
        "processes on a shared CPU; wall time shown beside it).",
        "",
        "## Training step (forward + backward + SGD step, train mode, backbone + 1x1 dense head, ERF-dense loss)",
        "",
        f"| backbone | batch | median {clock} s/step | median wall s/step | all {clock} timings (s) |",
        "|---|---|---|---|---|",
    ]
    for net, times in r["train_step_seconds"].items():
        m = r["train_step_median"][net]
        lines.append(
            f"| {net} | {a['batch']} | {m[clock]:.2f} | {m['wall']:.2f} | "
            f"{', '.join(f'{t[clock]:.2f}' for t in times)} |"
        )
    if r["paper_batch_step_seconds"]:
        first, timed = r["paper_batch_step_seconds"]
        lines.append(
            f"| {arch} | {a['paper_batch']} (paper per-GPU) | {timed[clock]:.2f} | {timed['wall']:.2f} | "
            f"one step after a first one at this shape ({first[clock]:.2f}) |"
        )
    fh, fw = r["feature_hw"]
    refs = list(r["refresh_in_steps"])
    lines += [
        "",
        f"## ERF refresh of {arch}: {a['montages']} montages, feature map {fh}x{fw} = {fh * fw} positions, "
        f"i.e. {r['backward_passes_per_refresh']} image-position input-gradient passes",
        "",
        f"| method | {clock} s | wall s | "
        + " | ".join(f"x step ({ref})" for ref in refs)
        + " | speed-up vs brute force |",
        "|---|---|---|" + "---|" * len(refs) + "---|",
    ]
    bf_m = r["bruteforce_montages"]
    for m, t in r["erf_refresh_seconds"].items():
        name = f"compute_erf(method={m!r})" if m != "bruteforce" else "compute_erf_bruteforce (loop)"
        if m == "bruteforce" and bf_m != a["montages"]:
            name += f" on {bf_m} montages, scaled x{a['montages'] / bf_m:g}"
        ratios = " | ".join(f"{r['refresh_in_steps'][ref][m]:.2f}" for ref in refs)
        lines.append(
            f"| {name} | {t[clock]:.1f} | {t['wall']:.1f} | {ratios} | {r['speedup_vs_bruteforce'][m]:.2f}x |"
        )
    passes = r["backward_passes_per_refresh"]
    methods = sorted(
        (m for m in r["erf_refresh_seconds"] if m != "bruteforce"),
        key=lambda m: r["erf_refresh_seconds"][m][clock],
    )
    best = methods[0]
    measured = "; ".join(
        f"{r['refresh_in_steps'][ref][best]:.1f} steps at {ref} ({'met' if r['refresh_in_steps'][ref][best] <= 5 else 'not met'})"
        for ref in refs
    )
    lines += [
        "",
        "## Reading it",
        "",
        f"- Arithmetic sets the ratio: an exact refresh is one forward of the {a['montages']} montages plus "
        f"{passes} input-gradient passes (one per image and feature position, each about one forward, no "
        "weight gradients), a training step about 3 forwards per image, so a refresh costs about "
        f"{passes} / (3 x batch) steps. No exact method changes that count; batching over positions can "
        "only remove overhead or fill a device better.",
        f"- Target <= 5 steps: by that count it needs a batch of about {-(-passes // 15)} or more. Measured "
        f"with the fastest method: {measured}. The cost is proportional to the montages averaged "
        "(`--montages`); refreshed every 5,000 steps (the paper), 10 steps would be 0.2 % of training.",
        "- `is_grads_batched=True` runs on torch's legacy vmap, which has no batching rule for "
        "`convolution_backward`, `native_batch_norm_backward` or `max_pool2d_with_indices_backward` and loops "
        "over the positions for them (then stacks the slices): the loop's work plus copies. "
        "`torch.func.vmap` (method 'func') batches for real but pays layout copies. "
        f"Measured order here, fastest first: {', '.join(methods)}. `auto` is the loop on CPU and 'func' on "
        "CUDA, where the loop would launch h*w small backward passes (the CUDA choice is not measured in "
        "this file unless it says device cuda).",
        "- The brute-force row runs the same algorithm as method 'loop'; their difference shows the timing "
        "noise.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
