"""bake-off: budget parsing, the equal-compute arithmetic of the plan (from probe measurements written
here), the verdicts, and (slow) a tiny real bake-off through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cheaplunch.bakeoff import BakeOff, Budget, Settings, parse_budget, parse_inits
from cheaplunch.bakeoff_run import Run
from cheaplunch.bakeoff_verdicts import summarise
from cheaplunch.stats import BETTER, TIE
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_parse_budget():
    assert parse_budget("3e15") == Budget(flops=3e15)
    assert parse_budget("500steps") == Budget(steps=500)
    assert parse_budget("500 steps") == Budget(steps=500)
    for bad in ("abc", "-1", "0steps", "nan"):
        with pytest.raises(UserError, match="--budget"):
            parse_budget(bad)


def test_a_run_is_done_only_when_it_trained_every_step(tmp_path):
    """A run stopped early by a signal (SLURM's USR1) writes its results too; it is not a finished run."""
    run = Run("finetune/detection/f1/scratch/seed0", "finetune", "finetune.py", ["--seed", "0"], tmp_path, "resnet18",
              steps=800)
    assert not run.done()
    (tmp_path / "results.json").write_text('{"bbox": {"AP": 0.1}}')
    (tmp_path / "compute.json").write_text('{"optimizer_steps": 350}')
    assert not run.done()
    (tmp_path / "compute.json").write_text('{"optimizer_steps": 800}')
    assert run.done()


def test_a_folder_made_by_another_command_is_not_reused(tmp_path):
    def run(*args):
        return Run("pretrain/montage", "pretrain", "train.py", ["--method", "montage", *args], tmp_path / "m", "r18")

    run("--logger", "csv", "trainer.max_steps=200").claim()
    run("--logger", "wandb", "trainer.max_steps=200").claim()  # another logger changes no result
    with pytest.raises(UserError, match=r"m was made by another command.*trainer.max_steps=1000"):
        run("--logger", "csv", "trainer.max_steps=1000").claim()


def test_overrides_of_what_the_bake_off_sets_are_refused(tmp_path):
    for override in ("seed=1", "data.root=/elsewhere", "data.subset_seed=3"):
        with pytest.raises(UserError, match=override.partition("=")[0]):
            BakeOff(Settings(data=None, methods=["scratch"], tasks=["detection"], seeds=3, budget=Budget(steps=30),
                             label_fractions=[1.0], inits={}, out=tmp_path, overrides=[override]))


def test_parse_inits(tmp_path, monkeypatch):
    assert parse_inits(["imagenet=/x/a.pt"]) == {"imagenet": "/x/a.pt"}
    # relative to where the user is, not to the repository the runs start in
    monkeypatch.chdir(tmp_path)
    assert parse_inits(["mine=ckpts/b.pt"]) == {"mine": str(tmp_path / "ckpts" / "b.pt")}
    for bad in (["noequals"], ["a=1", "a=2"], ["scratch=/x"], ["montage=/x"]):
        with pytest.raises(UserError, match="--init"):
            parse_inits(bad)


def _fake_probe(run, flops_per_step: float, seconds_per_step: float) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "compute.json").write_text(json.dumps({
        "flops_per_step": flops_per_step, "processes": 1, "optimizer_steps": 4,
        "wall_seconds": 4 * seconds_per_step}))


def test_plan_gives_equal_compute_to_scratch_plus(tmp_path):
    s = Settings(data=None, methods=["montage", "fcmae", "scratch"], tasks=["detection"], seeds=2,
                 budget=Budget(flops=6e12), label_fractions=[1.0], inits={"mine": "/x/b.pt"}, out=tmp_path)
    bake = BakeOff(s)
    probes = {p.key: p for p in bake.probes()}
    measured = {"probe/pretrain/montage": 2e9, "probe/pretrain/fcmae": 3e9,
                "probe/detection/resnet18": 4e9, "probe/detection/convnextv2_atto": 5e9}
    assert set(probes) == set(measured)
    for key, flops in measured.items():
        _fake_probe(probes[key], flops, 0.5)
    runs, info = bake.plan(probes)
    # pre-training steps = budget / FLOPs per step of the method
    assert info["pretrain_steps"] == {"montage": 3000, "fcmae": 2000}
    plain = bake.protocol_trainer("detection")[0]
    # scratch+ = plain steps + budget / scratch's fine-tuning FLOPs per step, per architecture
    assert info["scratch_plus_steps"] == {"detection/resnet18": plain + 1500,
                                          "detection/convnextv2_atto": plain + 1200}
    keys = {r.key for r in runs}
    arms = {"scratch", "scratch+", "scratch_convnextv2_atto", "scratch+_convnextv2_atto", "montage", "fcmae", "mine"}
    assert keys == {"pretrain/montage", "pretrain/fcmae"} | {
        f"finetune/detection/f1/{a}/seed{k}" for a in arms for k in (0, 1)}
    longer = next(r for r in runs if r.key == "finetune/detection/f1/scratch+/seed0")
    assert longer.args[-1] == f"trainer.max_steps={plain + 1500}" and longer.steps == plain + 1500
    assert bake.seconds(longer, probes) == pytest.approx(0.5 * (plain + 1500))
    fcmae = next(r for r in runs if r.key == "finetune/detection/f1/fcmae/seed1")
    assert fcmae.arch == "convnextv2_atto" and str(tmp_path / "pretrain" / "fcmae" / "backbone.pt") in fcmae.args


def test_the_estimate_adds_start_up_the_wait_for_data_and_validations(tmp_path):
    s = Settings(data=None, methods=["montage", "scratch"], tasks=["detection"], seeds=1, budget=Budget(steps=10),
                 label_fractions=[1.0], inits={}, out=tmp_path)
    bake = BakeOff(s)
    probes = {p.key: p for p in bake.probes()}
    _fake_probe(probes["probe/pretrain/montage"], 2e9, 0.5)
    probe = probes["probe/detection/resnet18"]
    probe.out.mkdir(parents=True)
    # 8 steps of 0.3 s + 0.1 s waiting for data; one validation of 8 of the loader's 32 batches in 6 s; the process
    # took 30 s, of which 12 s in training
    (probe.out / "compute.json").write_text(json.dumps({
        "flops_per_step": 4e9, "optimizer_steps": 8, "wall_seconds": 12.0, "step_seconds": 0.3,
        "data_seconds": 0.1, "validation_seconds": 6.0, "validation_batches": 8, "val_loader_batches": 32}))
    (probe.out / "launch.json").write_text(json.dumps({"process_seconds": 30.0}))
    run = next(r for r in bake.plan(probes)[0] if r.key == "finetune/detection/f1/scratch/seed0")
    steps, every = bake.protocol_trainer("detection")
    assert run.val_every == every > 0 and run.steps == steps
    assert bake.seconds(run, probes) == pytest.approx(18.0 + steps * 0.4 + steps // every * 6.0 * 32 / 8)


def test_a_steps_budget_is_the_first_methods_steps_and_every_method_gets_its_flops(tmp_path):
    s = Settings(data=None, methods=["montage", "fcmae", "scratch"], tasks=["detection"], seeds=1,
                 budget=Budget(steps=100), label_fractions=[1.0], inits={}, out=tmp_path)
    bake = BakeOff(s)
    probes = {p.key: p for p in bake.probes()}
    for key, flops in {"probe/pretrain/montage": 2e9, "probe/pretrain/fcmae": 8e9, "probe/detection/resnet18": 4e9,
                       "probe/detection/convnextv2_atto": 5e9}.items():
        _fake_probe(probes[key], flops, 0.5)
    runs, info = bake.plan(probes)
    assert info["budget_reference"] == "montage" and info["budget_flops"] == 100 * 2e9
    assert info["pretrain_steps"] == {"montage": 100, "fcmae": 25}  # 2e11 FLOPs each
    assert info["pretrain_flops"] == {"montage": 2e11, "fcmae": 2e11}
    plain = bake.protocol_trainer("detection")[0]
    assert info["scratch_plus_steps"] == {"detection/resnet18": plain + 50, "detection/convnextv2_atto": plain + 40}


def test_no_scratch_plus_for_an_architecture_nothing_pretrains(tmp_path):
    """--methods fcmae: the default architecture's scratch stays (the controls' baseline), its scratch+ would
    be compared with nothing; with an --init arm it is planned for that arm."""
    def plan(inits):
        bake = BakeOff(Settings(data=None, methods=["fcmae", "scratch"], tasks=["detection"], seeds=1,
                                budget=Budget(flops=1e12), label_fractions=[1.0], inits=inits, out=tmp_path))
        probes = {p.key: p for p in bake.probes()}
        for probe in probes.values():
            _fake_probe(probe, 1e9, 0.1)
        return {r.key.split("/")[3] for r in bake.plan(probes)[0] if r.kind == "finetune"}

    assert plan({}) == {"scratch", "scratch_convnextv2_atto", "scratch+_convnextv2_atto", "fcmae"}
    assert "scratch+" in plan({"mine": "/x/b.pt"})


def test_summarise_pairs_each_method_with_its_own_architecture():
    values = {"scratch": [0.10, 0.12, 0.11], "scratch+": [0.15, 0.16, 0.14], "montage": [0.20, 0.22, 0.21],
              "scratch_convnextv2_atto": [0.05, 0.06, 0.07], "scratch+_convnextv2_atto": [0.08, 0.09, 0.07],
              "fcmae": [0.08, 0.10, 0.06]}
    archs = {a: ("convnextv2_atto" if "convnext" in a or a == "fcmae" else "resnet18") for a in values}
    rows = {r.arm: r for r in summarise(values, "detection", 1.0, archs, {})}
    assert rows["montage"].verdict == BETTER
    assert rows["montage"].vs_scratch_equal.mean == pytest.approx(0.06)
    assert rows["montage"].vs_scratch_plain.mean == pytest.approx(0.10)
    assert rows["fcmae"].vs_scratch_equal.mean == pytest.approx(0.0)  # against the ConvNeXt scratch+
    assert rows["fcmae"].verdict == TIE
    assert rows["scratch"].verdict is None


def test_a_verdict_needs_every_seed_paired():
    values = {"scratch": [0.10, 0.12, 0.11], "scratch+": [0.15, 0.16], "montage": [0.20, 0.22, 0.21]}
    rows = {r.arm: r for r in summarise(values, "detection", 1.0, dict.fromkeys(values, "resnet18"), {})}
    assert rows["montage"].verdict == "no verdict: 3 seeds vs 2 of scratch+"
    assert rows["montage"].vs_scratch_equal is None
    assert rows["montage"].vs_scratch_plain.mean == pytest.approx(0.10)  # the plain pairing is complete


def test_plan_adds_the_controls(tmp_path):
    s = Settings(data=None, methods=["montage", "scratch"], tasks=["segmentation"], seeds=2, budget=Budget(steps=30),
                 label_fractions=[1.0], inits={}, out=tmp_path, controls=True, control_method="supervised",
                 control_factor=10)
    bake = BakeOff(s)
    probes = {p.key: p for p in bake.probes()}
    control_probe = probes["probe/pretrain/control_long"]
    assert control_probe.args[:2] == ["--method", "supervised"] and "model.arch=resnet18" in control_probe.args
    for probe in probes.values():
        _fake_probe(probe, 1e9, 0.1)
    _fake_probe(probes["probe/pretrain/montage"], 3e9, 0.1)  # the steps budget's reference: 30 x 3e9 FLOPs
    runs, info = bake.plan(probes)
    by_key = {r.key: r for r in runs}
    assert info["pretrain_flops"]["montage"] == 30 * 3e9
    # the positive control pre-trains for 10 budgets, in its own steps (30 x 10), and is fine-tuned from its backbone
    assert info["pretrain_steps"]["control_long"] == 300 and "trainer.max_steps=300" in by_key["pretrain/control_long"].args
    long0 = by_key["finetune/segmentation/f1/control_long/seed0"]
    assert long0.needs == "pretrain/control_long" and str(tmp_path / "pretrain/control_long") in long0.args
    # the negative control is scratch with other seeds, as many as the arms have
    negative = sorted(k for k in by_key if "/control_scratch/" in k)
    assert negative == ["finetune/segmentation/f1/control_scratch/seed100", "finetune/segmentation/f1/control_scratch/seed101"]
    args = by_key[negative[0]].args
    assert args[args.index("--seed") + 1] == "100" and args[args.index("--backbone") + 1] == "scratch"



def test_detection_control_trains_the_detection_protocol(tmp_path):
    """--control-method detection: the control is the detection protocol from scratch (finetune.py, the user's
    fine-tuning overrides, --control-factor budgets in the detector's own steps), fine-tuned again from its run."""
    s = Settings(data=None, methods=["scratch"], tasks=["detection"], seeds=1, budget=Budget(steps=30),
                 label_fractions=[1.0], inits={}, out=tmp_path, controls=True, control_method="detection",
                 control_factor=10, overrides=["optim.lr=1e-3"])
    bake = BakeOff(s)
    probes = {p.key: p for p in bake.probes()}
    for probe in probes.values():
        _fake_probe(probe, 1e9, 0.1)
    runs, info = bake.plan(probes)
    by_key = {r.key: r for r in runs}
    control = by_key["pretrain/control_long"]
    # its cost per step is the detection scratch probe's (the same run), not a second probe of it
    assert control.script == "finetune.py" and control.probe == "probe/detection/resnet18"
    assert "probe/pretrain/control_long" not in probes
    args = control.args
    assert args[args.index("--task") + 1] == "detection" and args[args.index("--backbone") + 1] == "scratch"
    assert args[args.index("--config") + 1].endswith("bakeoff/detection.yaml") and "optim.lr=1e-3" in args
    assert args[-1] == "trainer.max_steps=300" and info["pretrain_steps"]["control_long"] == 300
    assert control.val_every == 200  # configs/bakeoff/detection.yaml validates every 200 steps: the estimate counts them
    long0 = by_key["finetune/detection/f1/control_long/seed0"]
    assert long0.args[long0.args.index("--backbone") + 1] == str(tmp_path / "pretrain" / "control_long")
    # without a detection task nothing else measures it: it gets a probe of its own, the detection protocol
    seg = BakeOff(Settings(data=None, methods=["scratch"], tasks=["segmentation"], seeds=1, budget=Budget(steps=30),
                           label_fractions=[1.0], inits={}, out=tmp_path, controls=True, control_method="detection"))
    own = {p.key: p for p in seg.probes()}["probe/pretrain/control_long"]
    assert own.script == "finetune.py" and own.args[own.args.index("--task") + 1] == "detection"
    assert seg.control_probe() == "probe/pretrain/control_long"
    with pytest.raises(UserError, match="--control-method"):
        BakeOff(Settings(data=None, methods=["scratch"], tasks=["detection"], seeds=1, budget=Budget(steps=30),
                         label_fractions=[1.0], inits={}, out=tmp_path, controls=True, control_method="classification"))


def test_controls_of_one_seed_pass_nothing():
    archs = dict.fromkeys(("scratch", "control_long", "control_scratch"), "resnet18")
    rows = {r.arm: r for r in summarise({"scratch": [0.10], "control_long": [0.30], "control_scratch": [0.10]},
                                        "detection", 1.0, archs, {})}
    assert rows["control_long"].control_passed is False and rows["control_scratch"].control_passed is False


def test_controls_are_judged_against_plain_scratch():
    scratch = [0.10, 0.12, 0.11]
    archs = dict.fromkeys(("scratch", "scratch+", "control_long", "control_scratch"), "resnet18")
    # passes: +0.10 over scratch with seed SDs 0.01 (0.10 > 3 x 0.01); the negative control ties
    rows = {r.arm: r for r in summarise({"scratch": scratch, "scratch+": [0.2, 0.2, 0.2], "control_long": [0.20, 0.21, 0.22],
                                         "control_scratch": [0.11, 0.10, 0.12]}, "detection", 1.0, archs, {})}
    assert rows["control_long"].control == "positive" and rows["control_long"].control_passed
    assert rows["control_long"].vs_scratch_plain.mean == pytest.approx(0.10)
    # 3 x the larger of the control's seed SD (0.01) and that of all six scratch runs (0.0089, numpy below)
    assert rows["control_long"].control_threshold == pytest.approx(3 * 0.01)
    pooled = {"scratch": scratch, "control_long": [0.20, 0.20, 0.20], "control_scratch": [0.14, 0.08, 0.10]}
    row = {r.arm: r for r in summarise(pooled, "detection", 1.0, archs, {})}["control_long"]
    assert row.control_threshold == pytest.approx(3 * np.std(scratch + [0.14, 0.08, 0.10], ddof=1))
    assert rows["control_long"].vs_scratch_equal is None  # not compared at equal compute: it had 10x the budget
    assert rows["control_scratch"].control == "negative" and rows["control_scratch"].control_passed
    assert rows["control_scratch"].verdict == TIE
    # fails: +0.01 with a control SD of 0.02 (needs > 0.06); a "negative control" 0.1 above scratch on every seed
    rows = {r.arm: r for r in summarise({"scratch": scratch, "control_long": [0.12, 0.14, 0.10],
                                         "control_scratch": [0.20, 0.22, 0.21]}, "detection", 1.0, archs, {})}
    assert rows["control_long"].control_passed is False
    assert rows["control_scratch"].verdict == BETTER and rows["control_scratch"].control_passed is False


@pytest.mark.slow
def test_tiny_bakeoff_end_to_end(tiny_embedded, tmp_path):
    out = tmp_path / "bake"
    cmd = [sys.executable, str(REPO / "bakeoff.py"), "--data", str(tiny_embedded), "--methods", "montage", "scratch",
           "--task", "segmentation", "--seeds", "2", "--budget", "2steps", "--no-controls", "--out", str(out),
           "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=4"]
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "estimated" in dry.stdout and "finetune/segmentation/f1/scratch+/seed1" in dry.stdout
    assert "s/step, validated every 2" in dry.stdout  # the measured cost per step of every run
    assert not (out / "pretrain").exists()  # a dry run trains nothing but the probes
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bakeoff.json").read_text())
    arms = {r["arm"]: r for r in report["rows"]}
    assert set(arms) == {"scratch", "scratch+", "montage"}
    assert arms["montage"]["pretrain_flops"] > 0 and arms["montage"]["verdict"] in ("better", "tie", "worse")
    assert len(arms["montage"]["values"]) == 2
    assert (out / "bakeoff.md").is_file() and (out / "bakeoff.png").is_file()
    # a second call reuses every finished run
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0 and "(7 done)" in again.stdout


def test_command_puts_overrides_last_in_order(tmp_path):

    run = Run("k", "finetune", "finetune.py", ["--task", "detection", "trainer.max_steps=5", "--seed", "1",
                                               "--backbone", "/x/y.pt", "trainer.max_steps=9"], tmp_path, "resnet18")
    cmd = run.command()
    assert cmd[-2:] == ["trainer.max_steps=5", "trainer.max_steps=9"]
    assert cmd[2:8] == ["--task", "detection", "--seed", "1", "--backbone", "/x/y.pt"]


class _FakeSlurm:
    """sbatch / squeue / scancel as subprocess.run sees them: job ids from 100, squeue answering from `queued`,
    `on_poll(n)` called at the n-th squeue (1-based) before it answers; `failures` = squeue calls that time out."""

    def __init__(self, on_poll=lambda n: None, failures=()):
        self.queued, self.submitted, self.cancelled, self.polls = set(), [], [], 0
        self.on_poll, self.failures = on_poll, set(failures)

    def __call__(self, cmd, **kwargs):
        if cmd[0] == "sbatch":
            job = str(100 + len(self.submitted))
            self.submitted.append(cmd)
            self.queued.add(job)
            return subprocess.CompletedProcess(cmd, 0, f"{job};cluster\n", "")
        if cmd[0] == "scancel":
            self.cancelled += cmd[1:]
            return subprocess.CompletedProcess(cmd, 0, "", "")
        assert cmd[0] == "squeue"
        self.polls += 1
        self.on_poll(self.polls)
        if self.polls in self.failures:
            return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Socket timed out on send/recv")
        ids = cmd[cmd.index("-j") + 1].split(",")
        return subprocess.CompletedProcess(cmd, 0, "".join(f"{j}\n" for j in ids if j in self.queued), "")


def _pretrain_and_finetune(tmp_path):
    pre = Run("pretrain/montage", "pretrain", "train.py", ["--method", "montage"], tmp_path / "pre", "resnet18", 5)
    ft = Run("finetune/detection/f1/montage/seed0", "finetune", "finetune.py", ["--seed", "0"], tmp_path / "ft",
             "resnet18", 5, needs="pretrain/montage")
    return pre, ft


def _finish(run):
    (run.out / "compute.json").write_text('{"optimizer_steps": 5}')
    (run.out / "results.json").write_text('{"bbox": {"AP": 0.1}}')


def test_slurm_collector_waits_out_squeue_failures_and_collects_a_job_submitted_before(tmp_path, monkeypatch):
    """A re-run after the bake-off was interrupted collects the job still queued for a run instead of submitting
    it twice; squeue timing out now and then is waited out."""
    from cheaplunch import bakeoff_launch

    pre, ft = _pretrain_and_finetune(tmp_path)
    pre.out.mkdir(parents=True)
    (pre.out / "slurm_job_id").write_text("7\n")

    def on_poll(n):
        if n == 4:  # both jobs end (poll 1 asked about job 7 before submitting, polls 2 and 3 time out)
            _finish(pre), _finish(ft)
            fake.queued.clear()

    fake = _FakeSlurm(on_poll, failures={2, 3})
    fake.queued.add("7")
    monkeypatch.setattr(bakeoff_launch.subprocess, "run", fake)
    bakeoff_launch.execute_slurm([pre, ft], poll_seconds=0)
    assert len(fake.submitted) == 1 and "--dependency=afterok:7" in fake.submitted[0]  # only the fine-tuning
    assert fake.polls == 4 and not fake.cancelled


def test_slurm_collector_cancels_the_dependents_of_a_failed_job(tmp_path, monkeypatch):
    from cheaplunch import bakeoff_launch

    pre, ft = _pretrain_and_finetune(tmp_path)
    fake = _FakeSlurm(lambda n: fake.queued.discard("100"))  # the pre-training ends without its outputs
    monkeypatch.setattr(bakeoff_launch.subprocess, "run", fake)
    with pytest.raises(UserError, match="pretrain/montage: SLURM job 100 ended without its outputs"):
        bakeoff_launch.execute_slurm([pre, ft], poll_seconds=0)
    assert fake.cancelled == ["101"]  # its fine-tuning, which afterok would hold forever


def test_slurm_collector_gives_up_when_squeue_never_answers(tmp_path, monkeypatch):
    from cheaplunch import bakeoff_launch

    pre, _ = _pretrain_and_finetune(tmp_path)
    monkeypatch.setattr(bakeoff_launch.subprocess, "run", _FakeSlurm(failures=range(1, 100)))
    with pytest.raises(UserError, match="squeue did not answer 12 times"):
        bakeoff_launch.execute_slurm([pre], poll_seconds=0)


def test_finished_runs_give_back_their_checkpoints_unless_kept(tmp_path, monkeypatch):
    from cheaplunch import bakeoff_launch

    def fake_run(cmd, **kwargs):
        """A run writing its step, last and final checkpoints and its outputs."""
        out = Path(cmd[cmd.index("--out") + 1])
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in ("step0000200.ckpt", "last.ckpt", "final.ckpt"):
            (out / "checkpoints" / name).write_text("weights")
        _finish(next(r for r in runs if r.out == out))
        return 0

    monkeypatch.setattr(bakeoff_launch.subprocess, "call", fake_run)
    runs = _pretrain_and_finetune(tmp_path / "pruned")
    bakeoff_launch.execute(runs)
    pre, ft = runs
    assert [p.name for p in (pre.out / "checkpoints").iterdir()] == ["last.ckpt"]  # the control's fine-tunings read it
    assert not (ft.out / "checkpoints").exists() and ft.done()
    runs = _pretrain_and_finetune(tmp_path / "kept")
    bakeoff_launch.execute(runs, keep_checkpoints=True)
    assert len(list((runs[1].out / "checkpoints").iterdir())) == 3


def test_a_report_is_judged_again_from_its_values(tmp_path):
    """benchmarks/rejudge_bakeoff.py: a bakeoff.json written under one rule, judged again from its per-seed values
    (here the committed controls run, whose positive control failed the old bar of 3 x scratch's own SD)."""
    from benchmarks.rejudge_bakeoff import rejudge
    from cheaplunch.bakeoff_report import write_json

    scratch, control, negative = [0.0787, 0.0583, 0.0807], [0.1104, 0.1060, 0.1127], [0.0808, 0.0737, 0.0658]
    s = Settings(data="d", methods=["scratch"], tasks=["detection"], seeds=3, budget=Budget(steps=200),
                 label_fractions=[1.0], inits={}, out=tmp_path, controls=True)
    rows = summarise({"scratch": scratch, "control_long": control, "control_scratch": negative}, "detection", 1.0,
                     dict.fromkeys(("scratch", "control_long", "control_scratch"), "resnet18"), {})
    rows[1].control_passed, rows[1].control_threshold = False, 3 * np.std(scratch, ddof=1)  # the old rule's verdict
    write_json(tmp_path / "bakeoff.json", rows, s, "python bakeoff.py", {})
    _, again = rejudge(json.loads((tmp_path / "bakeoff.json").read_text()))
    positive = {r.arm: r for r in again}["control_long"]
    assert positive.control_threshold == pytest.approx(3 * np.std(scratch + negative, ddof=1))
    gain = np.mean(np.subtract(control, scratch))
    assert positive.control_passed == (gain > positive.control_threshold) and positive.control_passed
    assert positive.values == control and positive.arch == "resnet18"
