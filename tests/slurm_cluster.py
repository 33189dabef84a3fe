"""A private SLURM cluster on localhost for tests: slurmctld + two slurmd daemons simulating nodes n1 and
n2, configured from a generated slurm.conf in a temporary folder (no munge: auth/none, cred/none)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def slurm_available() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")) and os.geteuid() == 0


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False)
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        for token in self.run("scontrol", "show", "job", job_id, check=False).split():
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
        return None

    def wait_for(self, job_id: str, states: set[str], timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not reach {states} (state {self.job_state(job_id)}); logs in {self.root}")

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_cluster(root: Path) -> SlurmCluster:
    host = socket.gethostname()
    ctld_port, n1_port, n2_port = _free_ports(3)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=cheaplunchtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
TaskPlugin=task/none
ProctrackType=proctrack/linuxproc
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]
    cluster = SlurmCluster(root=root, env=env)
    log = (root / "daemons.log").open("w")
    commands = [["slurmctld", "-D", "-i", "-f", str(conf)],
                ["slurmd", "-D", "-N", "n1", "-f", str(conf)],
                ["slurmd", "-D", "-N", "n2", "-f", str(conf)]]
    for cmd in commands:
        cluster.processes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(0.5)
    deadline = time.time() + 60
    while time.time() < deadline:
        out = cluster.run("sinfo", "-h", "-o", "%T %D", check=False)
        if out.strip().startswith("idle") and out.split()[-1] == "2":
            return cluster
        time.sleep(1)
    cluster.stop()
    raise RuntimeError(f"private SLURM did not come up; see {root}/*.log: {(root / 'slurmctld.log').read_text()[-2000:]}")
