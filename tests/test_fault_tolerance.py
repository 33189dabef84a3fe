"""Fault tolerance of a plain train.py run: SIGTERM/SIGUSR1 save a checkpoint and exit cleanly, re-running
the same command resumes, and a non-finite loss stops with a clear message keeping the last good checkpoint."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from cheaplunch import REPO_ROOT

TINY = ["--method", "montage", "--logger", "none", "model.arch=resnet18", "data.canvas=64", "data.batch_size=4",
        "data.num_workers=0", "data.max_side=64", "trainer.accelerator=cpu", "model.erf.refresh_every=1000"]


def _command(data, out, *extra):
    return [sys.executable, "train.py", "--data", str(data), "--out", str(out), *TINY, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_checkpoint_and_rerun_resumes(tiny_embedded, tmp_path, signum):
    run = tmp_path / "run"
    cmd = _command(tiny_embedded, run, "trainer.max_steps=100000", "checkpoint.every_n_steps=100000")
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while "ERF refresh at step 0" not in (tmp_path / "log.txt").read_text():  # training has started
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    text = (tmp_path / "log.txt").read_text()
    assert "interrupted at step" in text
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    stopped_at = ckpt["global_step"]
    assert 0 < stopped_at < 100000

    # the same command with a reachable end resumes from that step and finishes
    result = subprocess.run(_command(tiny_embedded, run, f"trainer.max_steps={stopped_at + 2}",
                                     "checkpoint.every_n_steps=100000"),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr + result.stdout
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == stopped_at + 2


@pytest.mark.slow
def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_embedded, tmp_path):
    run = tmp_path / "run"
    # an absurd learning rate makes the weights (and then the loss) blow up within a few steps
    result = subprocess.run(_command(tiny_embedded, run, "optim.lr=1e30", "schedule.warmup_steps=0",
                                     "trainer.max_steps=50", "checkpoint.every_n_steps=1"),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss at step") and "checkpoints" in message
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    failed_step = int(message.split("step ")[1].split()[0])
    assert ckpt["global_step"] == failed_step  # the checkpoint before the bad step, not after it
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
