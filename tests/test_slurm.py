"""A real SLURM: a private two-node cluster on localhost (tests/slurm_cluster.py) runs a 2-node montage
pre-training through sbatch + srun; a preempted job (scancel --signal=USR1) saves, is requeued, resumes at
the same step and ends with the same weights as an uninterrupted job."""

import json
import sys
import time

import pytest
import torch

from common.paths import REPO_ROOT
from tests.slurm_cluster import slurm_available, start_cluster

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_available(), reason="needs slurm-wlm (make test installs it) and root")]

STEPS = 14
PREEMPT_AT = 6
TRAIN_ARGS = ["--method", "montage", "--logger", "none", "model.arch=resnet18", "data.canvas=64",
              "data.batch_size=4", "data.num_workers=0", "data.max_side=64", "trainer.accelerator=cpu",
              "model.erf.refresh_every=5", "logging.audit_ranks=true", "data.epoch_size=24",
              f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=1000"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def _submit(cluster, tmp_path, data, run, pause_at_step: int | None = None) -> str:
    """sbatch a 2-node job; with `pause_at_step`, both ranks pause after that step until SIGUSR1 arrives
    (tests/pause_at_step.py), so the preemption lands there however fast the machine is."""
    pause = f"-m tests.pause_at_step --step {pause_at_step} --signal USR1" if pause_at_step else ""
    script = tmp_path / "job.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=cheaplunch-test
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/slurm-%j.out
export MASTER_ADDR=127.0.0.1 WANDB_MODE=offline
cd {REPO_ROOT}
srun {sys.executable} {pause} train.py --data {data} --out {run} {' '.join(TRAIN_ARGS)}
""")
    out = cluster.run("sbatch", "--parsable", str(script))
    return out.strip().split(";")[0]


def _log(tmp_path, job_id):
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""  # may end mid-character


def _audit(run):
    return [json.loads((run / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, tiny_embedded, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("job_a")
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, tiny_embedded, run)
    state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    assert state == "COMPLETED", _log(tmp_path, job)[-3000:]
    return run, tmp_path, job


def test_two_node_job_runs_both_ranks_and_writes_one_checkpoint(uninterrupted_job):
    run, tmp_path, job = uninterrupted_job
    ranks = _audit(run)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_rank"] for r in ranks] == [0, 1]
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # one writer, once
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert f"SLURM job {job}: 2 node(s) x 1 task(s)" in _log(tmp_path, job)


def test_preempted_job_is_requeued_and_resumes_to_identical_weights(cluster, tiny_embedded, tmp_path,
                                                                    uninterrupted_job):
    run = tmp_path / "run"
    # step 6 ends the second epoch (2 ranks x 3 batches of 4 per 24-montage epoch), after the ERF refresh at 5
    job = _submit(cluster, tmp_path, tiny_embedded, run, pause_at_step=PREEMPT_AT)
    deadline = time.time() + 300
    while _log(tmp_path, job).count(f"paused at step {PREEMPT_AT}") < 2:  # both ranks
        assert time.time() < deadline, _log(tmp_path, job)[-3000:]
        assert cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path, job)[-3000:]
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", job)

    deadline = time.time() + 300
    while "resuming from" not in _log(tmp_path, job):  # saved, requeued, started again
        assert time.time() < deadline, _log(tmp_path, job)[-3000:]
        time.sleep(1)
    state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = _log(tmp_path, job)
    assert state == "COMPLETED", log[-3000:]
    assert int(cluster.job_field(job, "Restarts") or 0) >= 1
    assert f"SIGUSR1 at step {PREEMPT_AT}: saved" in log
    # the requeued job resumed at the step the checkpoint was written
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert "resuming from" in log.split(f"SIGUSR1 at step {PREEMPT_AT}")[1]
    uninterrupted = _audit(uninterrupted_job[0])
    assert _audit(run)[0]["weights_sha256"] == uninterrupted[0]["weights_sha256"]


def test_bakeoff_launcher_slurm_runs_every_run_as_a_job(cluster, tiny_embedded, tmp_path):
    """``bakeoff.py --launcher slurm``: every probe, pre-training and fine-tuning is its own sbatch job (two
    one-CPU nodes run two at once, so a fine-tuning started before its pre-training finished would fail: the
    afterok dependency is what lets this pass), and the report is collected when all are done."""
    import subprocess

    out = tmp_path / "bake"
    env = {**cluster.env, "MASTER_ADDR": "127.0.0.1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bakeoff.py", "--launcher", "slurm", "--data", str(tiny_embedded), "--methods", "montage",
           "scratch", "--task", "segmentation", "--seeds", "2", "--budget", "2steps", "--no-controls", "--out", str(out),
           "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=4", "data.num_workers=0"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    job_ids = sorted(out.rglob("slurm_job_id"))
    assert len(job_ids) == 2 + 1 + 6  # probes (montage, segmentation/resnet18), montage, 3 arms x 2 seeds
    assert len({p.read_text() for p in job_ids}) == len(job_ids)
    montage_ft = out / "finetune" / "segmentation" / "f1" / "montage" / "seed0"
    assert "#SBATCH --requeue" in (montage_ft / "job.sbatch").read_text()
    report = json.loads((out / "bakeoff.json").read_text())
    assert {r["arm"] for r in report["rows"]} == {"scratch", "scratch+", "montage"}
