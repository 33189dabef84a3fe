"""Settings derived from SLURM_* variables: nodes/devices, ranks via Lightning's SLURMEnvironment,
MASTER_ADDR, the run folder, and helpful errors on mismatches."""

import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from cheaplunch.config import BASE_CONFIG, load_config
from cheaplunch.registry import METHODS
from cheaplunch.runner import apply_slurm_environment, default_run_dir
from common import slurm
from common.errors import UserError
from common.paths import CONFIG_DIR

JOB = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "123456",
       "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5",
       "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("nodelist, first", [("gpu[07-08]", "gpu07"), ("n1,n2", "n1"), ("a[1,3-4],b2", "a1"),
                                             ("single", "single"), ("", None)])
def test_first_host(nodelist, first):
    assert slurm.first_host(nodelist) == first


def test_detect_and_trainer_settings():
    job = slurm.detect(JOB)
    assert job == slurm.SlurmJob("123456", num_nodes=2, tasks_per_node=4, num_tasks=8, first_host="gpu07")
    assert slurm.trainer_overrides(job, None, None) == {"devices": 4, "num_nodes": 2}
    # SLURM_TASKS_PER_NODE form when --ntasks-per-node was not given
    env = {k: v for k, v in JOB.items() if k != "SLURM_NTASKS_PER_NODE"} | {"SLURM_TASKS_PER_NODE": "4(x2)"}
    assert slurm.detect(env).tasks_per_node == 4
    assert slurm.detect({**JOB, "SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "3"}).job_id == "99_3"
    assert slurm.detect({**JOB, "SLURM_JOB_NAME": "bash"}) is None  # an interactive allocation
    assert slurm.detect({}) is None


def test_mismatches_give_a_hint():
    job = slurm.detect(JOB)
    with pytest.raises(UserError, match="ntasks-per-node=4"):
        slurm.trainer_overrides(job, 8, None)
    with pytest.raises(UserError, match="--nodes=2"):
        slurm.trainer_overrides(job, None, 4)
    uneven = slurm.detect({**JOB, "SLURM_NTASKS": "7"})
    with pytest.raises(UserError, match="one task per GPU"):
        slurm.trainer_overrides(uneven, None, None)


def test_lightning_sees_the_same_ranks(monkeypatch):
    for key, value in JOB.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "")  # unset for the code; restored after the test (it writes os.environ)
    monkeypatch.setattr(slurm.socket, "gethostbyname", lambda host: "10.0.0.7")
    cfg = OmegaConf.load(BASE_CONFIG)
    job = apply_slurm_environment(cfg)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    env = SLURMEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)
    assert env.main_address == "gpu07"  # MASTER_ADDR set to the first host
    assert default_run_dir("montage", job).name == "montage-123456"  # stable across requeues


def _in_job(monkeypatch) -> None:
    for key, value in JOB.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")


@pytest.mark.parametrize("user_yaml, overrides, message", [
    (CONFIG_DIR / "montage_paper.yaml", [], r"trainer.devices=8 disagrees with the SLURM job \(--ntasks-per-node=4\)"),
    (None, ["trainer.devices=1"], r"trainer.devices=1 disagrees with the SLURM job \(--ntasks-per-node=4\)"),
    (None, ["trainer.num_nodes=1"], r"trainer.num_nodes=1 disagrees with the SLURM job \(--nodes=2\)"),
])
def test_config_values_that_disagree_with_the_job_are_errors(monkeypatch, user_yaml, overrides, message):
    """A YAML or key=value setting is not silently replaced by the job's value (as --devices is not)."""
    _in_job(monkeypatch)
    cfg = load_config(METHODS["montage"].config_path, user_yaml, overrides)
    with pytest.raises(UserError, match=message):
        apply_slurm_environment(cfg)


def test_config_values_that_agree_with_the_job_or_are_unset_pass(monkeypatch):
    _in_job(monkeypatch)
    for overrides in ([], ["trainer.devices=4", "trainer.num_nodes=2"]):
        cfg = load_config(METHODS["montage"].config_path, None, overrides)
        apply_slurm_environment(cfg)
        assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)


def test_unresolvable_master_host_fails_early(monkeypatch):
    def fail(host):
        raise OSError("unknown host")

    monkeypatch.setattr(slurm.socket, "gethostbyname", fail)
    env: dict[str, str] = {}
    with pytest.raises(UserError, match="export MASTER_ADDR"):
        slurm.ensure_master_addr(slurm.detect(JOB), env)
    env["MASTER_ADDR"] = "10.1.2.3"
    assert slurm.ensure_master_addr(slurm.detect(JOB), env) == "10.1.2.3"
