#!/usr/bin/env python
"""Peak memory and time of the pixel contrastive loss, naive (all N x M similarities at once) vs exact
row-chunked (blocks of ``--chunk`` anchor rows, recomputed in backward), forward + backward, one image,
256-d unit features, fp32, one CPU thread.

Each measurement runs in its own subprocess: peak memory = the process's peak resident set size
(``ru_maxrss``) during forward + backward minus the peak before it (inputs already allocated). A naive
run is given an address-space cap (``--cap-gb`` above its start) so that it fails with "out of memory"
instead of exhausting the shared machine; such rows are reported as OOM at that cap.

    python benchmarks/contrastive_loss_memory.py            # writes benchmarks/results/contrastive_loss_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from models.pixel_contrastive import cross_image_loss, within_image_loss

    torch.set_num_threads(1)
    side = args.side
    g = torch.Generator().manual_seed(0)
    shape = (1, 256, side, side)
    f = F.normalize(torch.randn(shape, generator=g), dim=1).requires_grad_(True)
    fd = F.normalize(torch.randn(shape, generator=g), dim=1).requires_grad_(True)
    fo = F.normalize(torch.randn(shape, generator=g), dim=1).requires_grad_(True)
    lab = torch.randint(0, 8, (1, side, side), generator=g)
    lab[:, : side // 8] = 255
    lab_o = torch.randint(0, 8, (1, side, side), generator=g)
    chunk = None if args.method == "naive" else args.chunk
    # warm-up on a tiny problem: lazy initialisation (autograd, checkpoint, thread pools) is not the loss's memory
    w = [F.normalize(torch.randn(1, 256, 4, 4), dim=1).requires_grad_(True) for _ in range(3)]
    wl = torch.randint(0, 3, (1, 4, 4))
    within_image_loss(w[0], w[1], wl, formulation=args.formulation, chunk_size=None if chunk is None else 3).backward()
    cross_image_loss(w[0], w[1], wl, w[2], wl, formulation=args.formulation,
                     chunk_size=None if chunk is None else 3).backward()
    if args.cap_gb:
        vm = _vm_bytes()
        cap = vm + int(args.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        kw = dict(formulation=args.formulation, chunk_size=chunk)
        if args.loss == "within":
            loss = within_image_loss(f, fd, lab, **kw)
        else:
            loss = cross_image_loss(f, fd, lab, fo, lab_o, **kw)
        loss.backward()
    except (RuntimeError, MemoryError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {"oom": True, "error": str(exc).splitlines()[0][:200]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"oom": False, "loss": float(loss.detach()), "peak_bytes": peak - base, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "grad_norm": float(sum(x.grad.double().norm() ** 2 for x in (f, fd, fo) if x.grad is not None) ** 0.5)}


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _run(side: int, method: str, loss: str, formulation: str, chunk: int, cap_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--side", str(side), "--method", method, "--loss", loss,
           "--formulation", formulation, "--chunk", str(chunk), "--cap-gb", str(cap_gb if method == "naive" else 0)]
    # Fixed mmap threshold: large buffers are mapped and unmapped, so the resident-set peak follows the live
    # tensors instead of glibc's heap growth (the dynamic threshold would keep freed blocks in the heap).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"oom": True, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--method", default="chunked", choices=("naive", "chunked"))
    p.add_argument("--sides", type=int, nargs="+", default=[64, 96, 128], help="N = side^2 pixels per image")
    p.add_argument("--loss", default="within", choices=("within", "cross"))
    p.add_argument("--losses", nargs="+", default=["within", "cross"])
    p.add_argument("--formulation", default="paper", choices=("paper", "official"))
    p.add_argument("--chunk", type=int, default=512, help="anchor rows per block")
    p.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap of a naive run above its start")
    p.add_argument("--out", default=str(RESULTS / "contrastive_loss_memory"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    rows = []
    for loss in args.losses:
        for side in args.sides:
            row = {"loss": loss, "side": side, "N": side * side, "formulation": args.formulation, "chunk": args.chunk}
            for method in ("chunked", "naive"):
                row[method] = _run(side, method, loss, args.formulation, args.chunk, args.cap_gb)
                print(loss, side, method, row[method], flush=True)
            c, n = row["chunked"], row["naive"]
            if not c["oom"] and not n["oom"]:
                row["mem_ratio"] = c["peak_bytes"] / max(n["peak_bytes"], 1)
                row["rel_loss_diff"] = abs(c["loss"] - n["loss"]) / max(abs(n["loss"]), 1e-12)
                row["rel_grad_norm_diff"] = abs(c["grad_norm"] - n["grad_norm"]) / max(n["grad_norm"], 1e-12)
            rows.append(row)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "threads": 1,
            "cap_gb": args.cap_gb, "note": "CPU, shared machine; peak = ru_maxrss delta during forward+backward"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(rows, meta))
    print(out.with_suffix(".md").read_text())


def _fmt_mem(r: dict) -> str:
    return "OOM" if r["oom"] else f"{r['peak_bytes'] / 2**20:.0f} MiB"


def _fmt_t(r: dict) -> str:
    return "-" if r["oom"] else f"{r['cpu_s']:.1f} s"


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Pixel contrastive loss: chunked vs naive (forward + backward, 1 image, 256-d, fp32, 1 CPU thread)", "",
             f"Peak = resident-set high-water mark during forward + backward minus before it. Naive runs are capped "
             f"at {meta['cap_gb']:g} GiB of extra address space (OOM = failed there). Time = process CPU time "
             "(the machine is shared; wall time varies).", "",
             "| loss | N (pixels/image) | chunk rows | naive peak | chunked peak | chunked / naive | naive time | "
             "chunked time | rel. loss diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['mem_ratio']:.3f} (1/{1 / r['mem_ratio']:.0f})" if "mem_ratio" in r else "-"
        diff = f"{r['rel_loss_diff']:.1e}" if "rel_loss_diff" in r else "-"
        lines.append(f"| {r['loss']} | {r['side']}^2 = {r['N']} | {r['chunk']} | {_fmt_mem(r['naive'])} | "
                     f"{_fmt_mem(r['chunked'])} | {ratio} | {_fmt_t(r['naive'])} | {_fmt_t(r['chunked'])} | {diff} |")
    for r in rows:
        if r["naive"]["oom"]:
            lines.append(f"\n{r['loss']} N={r['N']}: naive failed: {r['naive'].get('error', '')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
