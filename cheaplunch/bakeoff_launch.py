"""Running a bake-off's plan (cheaplunch/bakeoff.py): here, one run at a time under a progress bar, or on
SLURM, every run its own sbatch job (a fine-tuning after its pre-training), collected when all finish."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable

from cheaplunch.bakeoff_run import Run
from common.errors import UserError
from common.paths import REPO_ROOT


def _pending(runs: list[Run]) -> list[Run]:
    """The runs not done yet, after every folder is checked against the command that made it (Run.claim)."""
    for run in runs:
        run.claim()
    return [r for r in runs if not r.done()]


def execute(runs: list[Run], estimate: Callable[[Run], float] | None = None, group: str | None = None,
            keep_checkpoints: bool = False) -> None:
    """Run what is not done, in order, one at a time, under a progress bar with the time spent and an
    estimate of what is left (from `estimate(run)` seconds, else from the runs done so far). `group` becomes
    every run's W&B group (WANDB_RUN_GROUP). Finished runs are pruned (Run.prune) unless `keep_checkpoints`."""
    from tqdm import tqdm

    env = dict(os.environ, **({"WANDB_RUN_GROUP": group} if group else {}))

    todo = _pending(runs)
    left = sum(estimate(r) for r in todo) if estimate else None
    with tqdm(total=len(runs), initial=len(runs) - len(todo), desc="bake-off", unit="run", dynamic_ncols=True) as bar:
        for run in todo:
            if left is not None:
                bar.set_postfix_str(f"{run.key}; about {left / 60:.0f} min left")
            else:
                bar.set_postfix_str(run.key)
            run.out.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            with open(run.log, "a") as log:
                code = subprocess.call(run.command(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
            # the whole process, start-up included (a probe's tells the plan what a run costs outside training)
            (run.out / "launch.json").write_text(json.dumps({"process_seconds": time.perf_counter() - started}) + "\n")
            if code != 0 or not run.done():
                raise UserError(f"{run.key} failed (exit {code}); its log is {run.log}: {run.log_tail()}")
            if not keep_checkpoints:
                run.prune()
            if left is not None and estimate is not None:
                left = max(left - estimate(run), 0.0)
            bar.update(1)


# ---- SLURM ---------------------------------------------------------------------------------------------
SBATCH_TEMPLATE = """#!/bin/bash
#SBATCH --job-name=bakeoff-{name}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@120
#SBATCH --open-mode=append
#SBATCH --output={log}
# one run of a bake-off (cheaplunch/bakeoff.py); requeued on preemption, it resumes from its last.ckpt
cd {repo}
export MASTER_ADDR="${{MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}}"
srun {command}
"""


SQUEUE_TRIES = 12  # polls without an answer from squeue before the collector gives up (the jobs keep running)


def _sbatch(args: list[str], env: dict[str, str]) -> str:
    try:
        result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise UserError("--launcher slurm: sbatch not found; run on a SLURM login node or use --launcher local") from None
    if result.returncode != 0:
        raise UserError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def _queued(job_ids: list[str], env: dict[str, str]) -> set[str] | None:
    """The jobs among `job_ids` that SLURM still holds (pending, running, requeued, completing); None when squeue
    did not answer (a busy controller: ask again)."""
    if not job_ids:
        return set()
    try:
        result = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True,
                                text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:  # a job that ended long ago is forgotten: squeue -j says "Invalid job id"
        return set() if "invalid job id" in result.stderr.lower() else None
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


def _still_queued(runs: list[Run], env: dict[str, str]) -> dict[str, str]:
    """{run key: job} of the jobs an earlier, interrupted bake-off submitted for `runs` that SLURM still holds (all
    of them when squeue cannot say), in one squeue call: collected again instead of submitted twice into a folder."""
    earlier = {r.key: (r.out / "slurm_job_id").read_text().strip() for r in runs if (r.out / "slurm_job_id").is_file()}
    earlier = {key: job for key, job in earlier.items() if job}
    queued = _queued(list(earlier.values()), env)
    return {key: job for key, job in earlier.items() if queued is None or job in queued}


def _cancel(job_ids: list[str], env: dict[str, str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, env=env, timeout=120)


def execute_slurm(runs: list[Run], sbatch_args: list[str] = (), group: str | None = None,
                  poll_seconds: float = 5.0, keep_checkpoints: bool = False) -> None:
    """Submit every run that is not done as its own SLURM job (``out/job.sbatch``, log ``out/bakeoff.log``),
    a fine-tuning after its pre-training (``--dependency=afterok``), then wait for all under a progress bar.
    A job that leaves the queue without its outputs is a UserError naming its log. Jobs are requeued on
    preemption (``--requeue --signal=SIGUSR1@120``) and resume from ``last.ckpt``, as ``train.py`` does."""
    import shlex

    from tqdm import tqdm

    env = dict(os.environ, **({"WANDB_RUN_GROUP": group} if group else {}))
    jobs: dict[str, str] = {}
    todo = _pending(runs)
    previous = _still_queued(todo, env)
    for run in todo:
        if run.key in previous:
            jobs[run.key] = previous[run.key]
            continue
        run.out.mkdir(parents=True, exist_ok=True)
        script = run.out / "job.sbatch"
        script.write_text(SBATCH_TEMPLATE.format(name=re.sub(r"[^\w.-]", "_", run.key), log=run.log,
                                                 repo=REPO_ROOT, command=shlex.join(run.command())))
        after = [jobs[run.needs]] if run.needs in jobs else []
        jobs[run.key] = _sbatch([*sbatch_args, *([f"--dependency=afterok:{':'.join(after)}"] if after else []),
                                 str(script)], env)
        (run.out / "slurm_job_id").write_text(jobs[run.key] + "\n")
    by_key = {r.key: r for r in todo}
    with tqdm(total=len(runs), initial=len(runs) - len(todo), desc="bake-off (SLURM)", unit="run",
              dynamic_ncols=True) as bar:
        waiting = dict(jobs)
        silent = 0  # squeue polls in a row without an answer
        while waiting:
            queued = _queued(list(waiting.values()), env)
            silent = silent + 1 if queued is None else 0
            if silent >= SQUEUE_TRIES:
                raise UserError(f"squeue did not answer {silent} times in a row; the jobs keep running: run the same "
                                "command again to collect them")
            for key, job in list(waiting.items()):
                if queued is None or job in queued:
                    continue
                run = by_key[key]
                if not run.done():
                    # its dependents would wait forever (afterok never holds): cancel them with it
                    _cancel([waiting[k] for k in waiting if by_key[k].needs == key], env)
                    raise UserError(f"{key}: SLURM job {job} ended without its outputs; its log is "
                                    f"{run.log}: {run.log_tail()}")
                if not keep_checkpoints:
                    run.prune()
                del waiting[key]
                bar.update(1)
            bar.set_postfix_str(f"{len(waiting)} jobs queued or running")
            if waiting:
                time.sleep(poll_seconds)
