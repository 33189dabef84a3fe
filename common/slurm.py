"""Settings derived from the SLURM environment, so an sbatch script states nodes and GPUs once.

Under `srun`, each task is one process (one GPU): Lightning's SLURMEnvironment reads the ranks from
SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID and requires `devices == --ntasks-per-node` and
`num_nodes == SLURM_NNODES`; we take both from the environment instead of asking the user to repeat them
(``trainer.devices`` / ``num_nodes`` default to null; a value set anyway must agree with the job).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import UserError


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    num_nodes: int
    tasks_per_node: int
    num_tasks: int
    first_host: str | None


def _tasks_per_node(env: Mapping[str, str]) -> int:
    """SLURM_NTASKS_PER_NODE if set, else the first count of SLURM_TASKS_PER_NODE ('2(x3),1' -> 2)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    match = re.match(r"(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    if match:
        return int(match.group(1))
    return int(env.get("SLURM_NTASKS", "1")) // max(int(env.get("SLURM_NNODES", "1")), 1)


def first_host(nodelist: str) -> str | None:
    """First host name of a SLURM node list ('n[1-3,5],m2' -> 'n1'), without calling scontrol."""
    if not nodelist:
        return None
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"([^\[]+)(?:\[(\d+)[^\]]*\])?", head)
    if match is None:
        return head
    prefix, number = match.groups()
    return prefix + (number or "")


def detect(env: Mapping[str, str] | None = None) -> SlurmJob | None:
    """The SLURM job this process is a task of, or None (not under srun, or an interactive shell)."""
    env = os.environ if env is None else env
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    job_id = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return SlurmJob(
        job_id=job_id or env.get("SLURM_JOB_ID", "0"),
        num_nodes=int(env.get("SLURM_NNODES", "1")),
        tasks_per_node=_tasks_per_node(env),
        num_tasks=int(env["SLURM_NTASKS"]),
        first_host=first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")),
    )


def trainer_overrides(job: SlurmJob, devices: int | None, num_nodes: int | None) -> dict[str, int]:
    """`trainer.devices` / `trainer.num_nodes` for this job. `devices` / `num_nodes` are the config's values
    (a YAML, key=value or --devices / --num-nodes; None = not set): a value that is set must agree with the
    job, since the job's would silently replace it."""
    if job.num_tasks != job.num_nodes * job.tasks_per_node:
        raise UserError(
            f"SLURM job {job.job_id}: {job.num_tasks} tasks on {job.num_nodes} nodes is not the same number per node; "
            "use #SBATCH --ntasks-per-node=<GPUs per node> (one task per GPU)")
    for name, given, derived, flag in (("devices", devices, job.tasks_per_node, "--ntasks-per-node"),
                                       ("num_nodes", num_nodes, job.num_nodes, "--nodes")):
        if given is not None and int(given) != derived:
            raise UserError(
                f"trainer.{name}={given} disagrees with the SLURM job ({flag}={derived}); remove it (option, "
                f"key=value or --config file) or set trainer.{name}=null: under SLURM it is read from the job "
                f"(hint: #SBATCH --ntasks-per-node must equal the GPUs per node)")
    return {"devices": job.tasks_per_node, "num_nodes": job.num_nodes}


def ensure_master_addr(job: SlurmJob, env: dict[str, str] | None = None) -> str:
    """Set MASTER_ADDR to the job's first host unless already set; fail early if it does not resolve
    (a 2-node job would otherwise hang until the rendezvous times out)."""
    env = os.environ if env is None else env
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    host = job.first_host
    if host is None:
        try:
            host = subprocess.run(["scontrol", "show", "hostnames"], capture_output=True, text=True,
                                  check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError) as exc:
            raise UserError("cannot tell the SLURM job's first host; export MASTER_ADDR") from exc
    try:
        socket.gethostbyname(host)
    except OSError as exc:
        raise UserError(f"SLURM host '{host}' does not resolve; export MASTER_ADDR=<its address> in the sbatch "
                        "script") from exc
    env["MASTER_ADDR"] = host
    return host
