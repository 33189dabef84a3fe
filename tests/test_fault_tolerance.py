"""Fault tolerance of a plain train.py run: SIGTERM/SIGUSR1 save a checkpoint and exit cleanly, re-running
the same command resumes and ends with exactly the weights of an uninterrupted run, and a non-finite
loss stops with a clear message naming the newest good checkpoint, and no checkpoint ever holds NaN/inf."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.paths import REPO_ROOT

TINY = ["--method", "montage", "--logger", "none", "model.arch=resnet18", "data.canvas=64", "data.batch_size=4",
        "data.num_workers=0", "data.max_side=64", "trainer.accelerator=cpu", "model.erf.refresh_every=5",
        "logging.audit_ranks=true", "data.epoch_size=24"]  # 6 batches per epoch: the stop lands mid-epoch
STEPS = 10


def _command(data, out, *extra):
    return [sys.executable, "train.py", "--data", str(data), "--out", str(out), *TINY, *extra]


def _final_weights(run):
    return json.loads((run / "audit" / "rank0.json").read_text())["weights_sha256"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_embedded, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = subprocess.run(_command(tiny_embedded, run, f"trainer.max_steps={STEPS}"), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("signame, step", [
    ("TERM", 3),  # mid-epoch
    ("TERM", 6),  # after the epoch's last batch (6 per epoch): Lightning alone resumes this into an empty epoch
    ("USR1", 6),
])
def test_signal_saves_checkpoint_and_rerun_resumes_exactly(tiny_embedded, tmp_path, uninterrupted, signame, step):
    run = tmp_path / "run"
    cmd = _command(tiny_embedded, run, f"trainer.max_steps={STEPS}")
    paused = [sys.executable, "-m", "tests.pause_at_step", "--step", str(step), "--signal", signame, *cmd[1:]]
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(paused, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while f"paused at step {step}" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(getattr(signal, f"SIG{signame}"))
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-2000:]
    text = log_path.read_text()
    assert f"interrupted at step {step}" in text or f"SIGUSR1 at step {step}" in text, text[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == step

    # the same command again resumes from that step, and ends with the uninterrupted run's weights
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr + result.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert _final_weights(run) == _final_weights(uninterrupted)


def _non_finite_tensor(tree, name=""):
    """The first floating tensor with NaN/inf under `tree` (written here, independent of the project's check)."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and (torch.isnan(tree).any() or torch.isinf(tree).any()) else None
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else []
    return next((bad for k, v in children if (bad := _non_finite_tensor(v, f"{name}/{k}")) is not None), None)


SUPERVISED = ["--method", "supervised", "--logger", "none", "model.arch=resnet18", "data.batch_size=4",
              "data.num_workers=0", "trainer.accelerator=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["montage", "supervised"])
def test_non_finite_loss_stops_with_message_and_keeps_only_finite_checkpoints(tiny_embedded, tmp_path, method):
    """Issue #14 case 1: at lr 1e6 (supervised) BatchNorm's running_var reaches inf a step before the loss
    does; no checkpoint may hold it, and the message names the newest good one, which resumes with a sane lr."""
    run = tmp_path / "run"

    def command(*extra):
        if method == "montage":
            return _command(tiny_embedded, run, *extra)
        return [sys.executable, "train.py", "--data", str(tiny_embedded), "--out", str(run), *SUPERVISED, *extra]

    result = subprocess.run(command("optim.lr=1e6", "schedule.warmup_steps=0", "trainer.max_steps=50",
                                    "checkpoint.every_n_steps=1"),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss at step") and "Traceback" not in result.stderr, message
    written = sorted((run / "checkpoints").glob("*.ckpt"))
    assert written, "no checkpoint at all: the test no longer reaches a good step before the blow-up"
    for path in written:
        ckpt = torch.load(path, weights_only=False, map_location="cpu")
        assert _non_finite_tensor({"state_dict": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"]}) is None, path
    good = message.split("--resume ")[1].split()[0]
    assert Path(good) in written
    assert not list((run / "checkpoints").glob(".*"))  # no temporary files left behind
    if method == "montage":
        # montage's loss turns NaN at the first step whose state is non-finite; its last finite weights were
        # already wrecked by lr 1e6 (finite, huge), so only the supervised run can show a clean resume
        return
    # the state after the last good step had inf BN statistics: refused and reported; it resumes cleanly
    assert "not written at step" in result.stderr and "running_var holds NaN/inf" in result.stderr
    steps = torch.load(good, weights_only=False, map_location="cpu")["global_step"] + 2
    resumed = subprocess.run(command("optim.lr=1e-3", "schedule.warmup_steps=0", f"trainer.max_steps={steps}",
                                     "--resume", good),
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_checkpoint_writer_refuses_non_finite_and_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    """SafeCheckpointIO: a NaN anywhere (a buffer, an optimizer moment) is not written; a write that fails
    half-way (ENOSPC) leaves the previous file byte for byte and no temporary behind."""
    import errno

    from callbacks.fault_tolerance import SafeCheckpointIO, remove_stray_temporaries
    from common.errors import UserError

    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    good = {"state_dict": {"bn.running_var": torch.ones(4)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4)}}}],
            "global_step": 3}
    io.save_checkpoint(good, path)
    before = path.read_bytes()
    for where in ("state_dict", "optimizer_states"):
        bad = {**good, "global_step": 4}
        if where == "state_dict":
            bad["state_dict"] = {"bn.running_var": torch.tensor([1.0, float("inf"), 1.0, 1.0])}
        else:
            bad["optimizer_states"] = [{"state": {0: {"exp_avg": torch.tensor([float("nan"), 0.0])}}}]
        io.save_checkpoint(bad, path)
        assert path.read_bytes() == before and io.refused_step == 4

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"x" * 10)  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"no space left on the device\); the previous checkpoint there is intact"):
        io.save_checkpoint({**good, "global_step": 5}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    (tmp_path / ".last.ckpt.tmp-123").write_bytes(b"half")  # a write killed with the process
    assert remove_stray_temporaries(tmp_path) == [tmp_path / ".last.ckpt.tmp-123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resuming_another_model_is_a_clear_error_before_training(tmp_path):
    """The same --out re-run with another model: one UserError naming the file, the mismatched keys and the
    changed settings (PretrainModule.on_load_checkpoint, before Lightning loads the weights); a file that
    is not a whole checkpoint is caught before fit."""
    from omegaconf import OmegaConf

    from callbacks.fault_tolerance import check_resume_checkpoint
    from common.errors import UserError
    from lightning_modules.base import resume_mismatch

    own = torch.nn.Linear(2, 3).state_dict()
    cfg = OmegaConf.create({"model": {"arch": "small", "num_classes": 3}})
    path = tmp_path / "last.ckpt"
    same = {"state_dict": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)},
            "hyper_parameters": {"config": {"model": {"arch": "small", "num_classes": 3}}}}
    assert resume_mismatch(own, same, cfg, path) == ""

    bigger = {"state_dict": {"weight": torch.zeros(4, 2), "bias": torch.zeros(3), "extra": torch.zeros(1)},
              "hyper_parameters": {"config": {"model": {"arch": "big", "num_classes": 3}}}}
    message = resume_mismatch(own, bigger, cfg, path)
    assert message.startswith(f"{path}: cannot resume")
    assert "unexpected (1): extra" in message and "weight (4, 2) vs (3, 2)" in message
    assert "model.arch: 'big' -> 'small'" in message and "num_classes" not in message
    assert "--resume never" in message

    torch.save(same, path)
    check_resume_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read the checkpoint to resume from"):
        check_resume_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="cannot read the checkpoint to resume from"):
        check_resume_checkpoint(path)


def test_half_written_last_ckpt_offers_the_newest_intact_step_checkpoint(tmp_path):
    """Issue #14: the refusal of a cut-short last.ckpt names the newest whole step*.ckpt to resume from."""
    from callbacks.fault_tolerance import check_resume_checkpoint, newest_intact_step_checkpoint
    from common.errors import UserError

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    last = ckpts / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, last)
    check_resume_checkpoint(last)  # whole: no error
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as err:
        check_resume_checkpoint(last)
    message = str(err.value)
    assert message.startswith(f"{last}: cannot read the checkpoint to resume from") and "--resume never" in message
    assert "--resume " + str(ckpts) not in message and len(message.splitlines()) == 1  # nothing intact to offer
    for step in (2, 4):
        (ckpts / f"step{step:07d}.ckpt").write_bytes(whole)
    (ckpts / "step0000006.ckpt").write_bytes(whole[:100])  # the newest, also cut short
    (ckpts / "notes.ckpt").write_bytes(whole)  # not a step checkpoint
    assert newest_intact_step_checkpoint(ckpts) == ckpts / "step0000004.ckpt"
    with pytest.raises(UserError) as err:
        check_resume_checkpoint(last)
    message = str(err.value)
    assert f"resume from the newest intact checkpoint with --resume {ckpts / 'step0000004.ckpt'}" in message
    assert "--resume never" in message and len(message.splitlines()) == 1
    assert newest_intact_step_checkpoint(ckpts, exclude=ckpts / "step0000004.ckpt") == ckpts / "step0000002.ckpt"
    assert newest_intact_step_checkpoint(tmp_path / "absent") is None
