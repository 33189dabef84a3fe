"""The bake-off: pre-training methods against each other and against scratch at equal measured compute,
fine-tuned on the user's own detection / segmentation data, with seed intervals and paired verdicts.

It is a plan of independent runs, one folder each under ``--out``:

1. ``probe/...``: an 8-step run of every pre-training method and of every (task, architecture) fine-tuning,
   whose ``compute.json`` (``callbacks.compute.ComputeMeter``) gives the FLOPs and seconds per step;
2. ``pretrain/<method>[_f<fraction>]``: ``train.py --method <method>`` for the budget, the same FLOPs for every
   method, divided by its measured FLOPs per step (a budget of N steps is N steps of the first method listed);
3. ``finetune/<task>/f<fraction>/<arm>/seed<k>``: ``finetune.py --task <task> --config
   configs/bakeoff/<task>.yaml`` (the protocol) from each backbone, from scratch, and from each ``--init``.

Scratch appears twice per architecture: ``scratch`` (the plain fine-tuning schedule) and ``scratch+``
(the plain schedule plus the steps that the pre-training budget buys at scratch's measured fine-tuning
FLOPs per step: equal total compute, He et al. 2019). A method's verdict is its seed-paired difference to
``scratch+`` of its own architecture (better / tie / worse from the 95% interval); the difference to
plain ``scratch`` is shown beside it. A finished run is never re-run and an interrupted one resumes from
its ``last.ckpt`` (every run is launched with ``--resume auto``), so re-running the command continues; a folder
that another command made (other settings) is an error, not a result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cheaplunch.bakeoff_run import PROBE_STEPS, Run, read_json
from cheaplunch.bakeoff_verdicts import NEGATIVE_CONTROL, POSITIVE_CONTROL, ArmResult, headline, summarise
from common.errors import UserError
from common.paths import CONFIG_DIR, REPO_ROOT

METHODS = ("montage", "fcmae", "contrastive", "supervised")
TASKS = ("detection", "segmentation")
NEGATIVE_SEED_OFFSET = 100  # the negative control fine-tunes scratch with seeds 100, 101, ...
# The positive control's pre-training: a pre-training method, or "detection": the detection protocol's detector
# trained from scratch on the train split (every label), whose backbone the control fine-tunes again. The task
# itself is the pre-training surest to transfer; a supervised control (object crops) did not transfer at all
# (benchmarks/results/bakeoff_controls).
CONTROL_METHODS = (*METHODS, "detection")
LABEL_USING = ("montage", "supervised", "contrastive")  # pre-train on the labelled subset only
PROBE_VAL_BATCHES = 8  # a fine-tuning probe validates once on this many batches (timed, then extrapolated)


@dataclass(frozen=True)
class Budget:
    """Pre-training budget: FLOPs (device-independent) or optimizer steps."""

    flops: float | None = None
    steps: int | None = None

    def describe(self) -> str:
        return f"{self.flops:.3g} FLOPs" if self.flops is not None else f"{self.steps} steps"


def parse_budget(text: str) -> Budget:
    """'3e15' (FLOPs) or '500steps' / '500 steps' (optimizer steps)."""
    value = text.strip().lower().replace("_", "")
    match = re.fullmatch(r"(\d+)\s*steps?", value)
    if match:
        if int(match.group(1)) <= 0:
            raise UserError(f"--budget {text}: steps must be positive")
        return Budget(steps=int(match.group(1)))
    try:
        flops = float(value.removesuffix("flops"))
    except ValueError:
        raise UserError(f"--budget '{text}': give FLOPs (e.g. 3e15) or steps (e.g. 500steps)") from None
    if not math.isfinite(flops) or flops <= 0:
        raise UserError(f"--budget {text}: FLOPs must be a positive number")
    return Budget(flops=flops)


def parse_inits(items: Iterable[str]) -> dict[str, str]:
    """--init NAME=PATH (repeatable) -> {name: absolute path}."""
    inits: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--init must be NAME=PATH (e.g. imagenet=ckpts/resnet18.pt), got '{item}'")
        if name in inits or name.startswith(("scratch", "control_")) or name in METHODS:
            raise UserError(f"--init name '{name}' is taken (distinct, not a method, not starting with 'scratch' "
                            "or 'control_')")
        inits[name] = str(Path(path).expanduser().resolve())  # the runs start in the repository, not here
    return inits


# Config keys every run of a bake-off gets from the bake-off itself: an override would give every seed, or the
# pre-training and its fine-tuning, the same or different values behind the plan's back.
BAKEOFF_KEYS = {"seed": "from --seeds", "data.root": "from --data", "data.label_fraction": "from --label-fractions",
                "data.label_count": "from --label-fractions", "data.subset_seed": "the same subset for every arm",
                "logging.logger": "from --logger"}


@dataclass
class Settings:
    data: str | None
    methods: list[str]
    tasks: list[str]
    seeds: int
    budget: Budget
    label_fractions: list[float]
    inits: dict[str, str]
    out: Path
    logger: str = "none"
    detector: str | None = None  # None: the protocol's (configs/bakeoff/detection.yaml)
    overrides: list[str] = field(default_factory=list)
    pretrain_overrides: list[str] = field(default_factory=list)
    controls: bool = False
    # detection: the only control measured to transfer (benchmarks/results/bakeoff_controls: +3.7 AP over scratch,
    # where 6000 supervised steps gave -0.04); 10 x the default 200-step budget = 2000 detection steps, 6.9e13 FLOPs,
    # 2.5x one detection fine-tuning
    control_method: str = "detection"
    control_factor: float = 10.0

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in (*METHODS, "scratch")]
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; choose from {', '.join((*METHODS, 'scratch'))}")
        if self.seeds < 1:
            raise UserError("--seeds must be at least 1 (3 or more for intervals)")
        for f in self.label_fractions:
            if not 0.0 < f <= 1.0:
                raise UserError(f"--label-fractions: {f} is not in (0, 1]")
        for override in (*self.overrides, *self.pretrain_overrides):
            key = override.partition("=")[0]
            if key in BAKEOFF_KEYS:
                raise UserError(f"'{override}': the bake-off sets {key} itself ({BAKEOFF_KEYS[key]}); "
                                "it cannot be overridden")
        if self.controls and self.control_method not in CONTROL_METHODS:
            raise UserError(f"--control-method must be one of {', '.join(CONTROL_METHODS)}, "
                            f"got '{self.control_method}'")
        if self.controls and self.control_factor <= 1:
            raise UserError(f"--control-factor must exceed 1 (the positive control's pre-training is this many "
                            f"times the budget), got {self.control_factor:g}")


def method_arch(method: str) -> str:
    """The architecture a method's default YAML pre-trains."""
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS as REGISTERED

    return str(load_config(REGISTERED[method].config_path).model.arch)


def default_data() -> Path:
    """The embedded set a bake-off without --data runs on (built once, cached): the one the fine-tuning
    protocol was chosen on, settings in configs/bakeoff/data.yaml."""
    from omegaconf import OmegaConf

    from tools.embedded import build_embedded

    cfg = OmegaConf.load(CONFIG_DIR / "bakeoff" / "data.yaml").embedded
    return build_embedded(REPO_ROOT / cfg.folder, size=int(cfg.size), val_size=int(cfg.val_size), seed=int(cfg.seed),
                          image_size=int(cfg.image_size), max_objects=int(cfg.max_objects),
                          scale=(float(cfg.scale[0]), float(cfg.scale[1])))


def protocol_yaml(task: str) -> Path:
    return CONFIG_DIR / "bakeoff" / f"{task}.yaml"


def detector_of(s: Settings) -> str:
    """The detector the bake-off fine-tunes: --detector, else the detection protocol's."""
    from omegaconf import OmegaConf

    return s.detector or str(OmegaConf.load(protocol_yaml("detection")).model.detector)


def fraction_tag(fraction: float) -> str:
    return f"f{fraction:g}"


def pretrain_name(method: str, fraction: float) -> str:
    """Folder name of a method's pre-training run: label-using methods pre-train on the labelled subset, so
    they get one run per label fraction; the others one run for every fraction."""
    return method if fraction == 1.0 or method not in LABEL_USING else f"{method}_{fraction_tag(fraction)}"


def scratch_name(arch: str, default_arch: str) -> str:
    return "scratch" if arch == default_arch else f"scratch_{arch}"


class BakeOff:
    """The plan of a bake-off and its results (see the module docstring)."""

    def __init__(self, s: Settings) -> None:
        s.validate()
        self.s = s
        self.pretrain_methods = [m for m in s.methods if m != "scratch"]
        self.archs = {m: method_arch(m) for m in self.pretrain_methods}
        self.default_arch = method_arch("montage")
        self.scratch_archs = sorted(set(self.archs.values()) | {self.default_arch})
        self.common = ["--logger", s.logger] + (["--data", s.data] if s.data else [])

    # ---- probes ------------------------------------------------------------------------------------
    def task_args(self, task: str) -> list[str]:
        args = ["--task", task, "--config", str(protocol_yaml(task)), *self.common]
        return args + (["--detector", self.s.detector] if task == "detection" and self.s.detector else [])

    def probes(self) -> list[Run]:
        """PROBE_STEPS-step runs measuring each pre-training's and each (task, arch) fine-tuning's cost per step (the
        probe's own settings come last, so the user's overrides cannot change its length)."""
        quick = [f"trainer.max_steps={PROBE_STEPS}", "checkpoint.every_n_steps=1000000"]
        # one validation at the end, on a few batches: what a validation costs
        quick_finetune = [*quick, f"trainer.val_check_interval={PROBE_STEPS}",
                          f"trainer.limit_val_batches={PROBE_VAL_BATCHES}"]
        runs = [Run(f"probe/pretrain/{m}", "probe", "train.py",
                    ["--method", m, *self.common, "--seed", "0", *self.s.pretrain_overrides, *quick],
                    self.s.out / "probe" / "pretrain" / m, self.archs[m], PROBE_STEPS, f"probe/pretrain/{m}")
                for m in self.pretrain_methods]
        if self.s.controls and self.control_probe() == f"probe/pretrain/{POSITIVE_CONTROL}":
            script, args = self.control_command()
            runs.append(Run(f"probe/pretrain/{POSITIVE_CONTROL}", "probe", script,
                            [*args, *(quick_finetune if script == "finetune.py" else quick)],
                            self.s.out / "probe" / "pretrain" / POSITIVE_CONTROL,
                            self.default_arch, PROBE_STEPS, f"probe/pretrain/{POSITIVE_CONTROL}"))
        for task in self.s.tasks:
            for arch in self.scratch_archs:
                runs.append(Run(f"probe/{task}/{arch}", "probe", "finetune.py",
                                [*self.task_args(task), "--backbone", "scratch", "--arch", arch, *self.s.overrides,
                                 *quick_finetune],
                                self.s.out / "probe" / task / arch, arch, PROBE_STEPS, f"probe/{task}/{arch}"))
        return runs

    def control_command(self) -> tuple[str, list[str]]:
        """(script, arguments) of the positive control's pre-training: --control-method on the default
        architecture (so it is compared with the default scratch), on every label (whatever the label fraction);
        the plan gives it --control-factor x the budget. "detection" trains the detection protocol from scratch."""
        if self.s.control_method == "detection":
            return "finetune.py", [*self.task_args("detection"), "--backbone", "scratch", "--arch", self.default_arch,
                                   "--seed", "0", *self.s.overrides]
        return "train.py", ["--method", self.s.control_method, *self.common, "--seed", "0",
                            *self.s.pretrain_overrides, f"model.arch={self.default_arch}"]

    def control_probe(self) -> str:
        """Key of the probe measuring the positive control's cost per step: a detection control trains what the
        default architecture's detection scratch probe already measures, when detection is a task."""
        if self.s.control_method == "detection" and "detection" in self.s.tasks:
            return f"probe/detection/{self.default_arch}"
        return f"probe/pretrain/{POSITIVE_CONTROL}"

    def per_step(self, run: Run) -> tuple[float, float]:
        """(FLOPs, wall seconds) per optimizer step of a finished probe; the seconds include the wait for data."""
        c = run.compute()
        if not c.get("flops_per_step"):
            raise UserError(f"{run.out}: the probe measured no FLOPs (compute.json missing or empty)")
        seconds = c.get("step_seconds") or float(c["wall_seconds"]) / max(c["optimizer_steps"], 1)
        return float(c["flops_per_step"]) * int(c.get("processes", 1)), float(seconds) + (c.get("data_seconds") or 0.0)

    def protocol_trainer(self, task: str) -> tuple[int, int]:
        """(steps, steps between validations) of the task's fine-tuning protocol with the user's overrides."""
        from cheaplunch.config import load_config
        from cheaplunch.registry import TASKS as REGISTERED

        cfg = load_config(REGISTERED[task].config_path, protocol_yaml(task),
                          [o for o in self.s.overrides if o.startswith("trainer.")]).trainer
        return int(cfg.max_steps), int(cfg.val_check_interval or 0) if cfg.check_val_every_n_epoch is None else 0

    # ---- the plan ----------------------------------------------------------------------------------
    def plan(self, probes: dict[str, Run]) -> tuple[list[Run], dict[str, Any]]:
        """Pre-training and fine-tuning runs, and the budget arithmetic behind them (from the probes)."""
        s, info = self.s, {"pretrain_steps": {}, "pretrain_flops": {}, "scratch_plus_steps": {}}
        runs: list[Run] = []

        def in_flops(probe: str) -> float:
            """--budget in FLOPs: as given, or its steps of the run `probe` measured."""
            return s.budget.flops if s.budget.flops is not None else s.budget.steps * self.per_step(probes[probe])[0]

        # Every method gets the same FLOPs in its own number of steps; a budget in steps is counted in those of the
        # reference run (the first pre-training method, else the positive control).
        reference = f"probe/pretrain/{self.pretrain_methods[0]}" if self.pretrain_methods else self.control_probe()
        budget = in_flops(reference) if s.budget.flops is not None or self.pretrain_methods or s.controls else 0.0
        if s.budget.flops is None and budget:
            info["budget_reference"] = reference.removeprefix("probe/pretrain/")
        info["budget_flops"] = budget

        def budget_steps(probe: str, factor: float = 1.0, flops_budget: float = budget) -> tuple[int, float]:
            """(steps, FLOPs) of `factor` x `flops_budget` for the run the probe measured."""
            flops, _ = self.per_step(probes[probe])
            steps = max(1, round(factor * flops_budget / flops))
            return steps, steps * flops

        def pretrain_run(name: str, args: list[str], arch: str, steps: int, probe: str,
                         script: str = "train.py", val_every: int = 0) -> Run:
            """A pre-training into <out>/pretrain/<name>; its length comes last, so no override can change it."""
            return Run(f"pretrain/{name}", "pretrain", script, [*args, f"trainer.max_steps={steps}"],
                       s.out / "pretrain" / name, arch, steps, probe, val_every=val_every)

        for m in self.pretrain_methods:
            info["pretrain_steps"][m], info["pretrain_flops"][m] = budget_steps(f"probe/pretrain/{m}")
        # scratch+ of an architecture no method pre-trains serves only the --init arms (whose architecture is theirs)
        budget_by_arch = {arch: max([info["pretrain_flops"][m] for m in self.pretrain_methods
                                     if self.archs[m] == arch] or [budget if s.inits else 0.0])
                          for arch in self.scratch_archs}
        for fraction in s.label_fractions:
            for m in self.pretrain_methods:
                sub = pretrain_name(m, fraction)
                if any(r.key == f"pretrain/{sub}" for r in runs):
                    continue
                extra = [f"data.label_fraction={fraction}"] if fraction < 1.0 and m in LABEL_USING else []
                runs.append(pretrain_run(sub, ["--method", m, *self.common, "--seed", "0", *extra,
                                               *s.pretrain_overrides],
                                         self.archs[m], info["pretrain_steps"][m], f"probe/pretrain/{m}"))
        if s.controls:
            probe = self.control_probe()
            # a check of the protocol, not an arm of the comparison: a budget in steps counts its own steps
            steps, flops = budget_steps(probe, s.control_factor, in_flops(probe))
            info["pretrain_steps"][POSITIVE_CONTROL], info["pretrain_flops"][POSITIVE_CONTROL] = steps, flops
            script, args = self.control_command()
            # a detection control trains the detection protocol, which validates as it goes
            val_every = self.protocol_trainer("detection")[1] if s.control_method == "detection" else 0
            runs.append(pretrain_run(POSITIVE_CONTROL, args, self.default_arch, steps, probe, script, val_every))
        for task in s.tasks:
            plain, val_every = self.protocol_trainer(task)
            for fraction in s.label_fractions:
                arms: list[tuple[str, str, list[str], int]] = []  # name, arch, arguments, steps
                needs: dict[str, str] = {}  # arm -> the pre-training run it fine-tunes
                for arch in self.scratch_archs:
                    name = scratch_name(arch, self.default_arch)
                    ft_flops, _ = self.per_step(probes[f"probe/{task}/{arch}"])
                    longer = plain + round(budget_by_arch[arch] / ft_flops)
                    info["scratch_plus_steps"][f"{task}/{arch}"] = longer
                    arms.append((name, arch, ["--backbone", "scratch", "--arch", arch], plain))
                    if longer > plain:  # no pre-training of this architecture: scratch+ would be scratch again
                        arms.append((name.replace("scratch", "scratch+", 1), arch,
                                     ["--backbone", "scratch", "--arch", arch, f"trainer.max_steps={longer}"], longer))
                for m in self.pretrain_methods:
                    sub = pretrain_name(m, fraction)
                    arms.append((m, self.archs[m], ["--backbone", str(s.out / "pretrain" / sub / "backbone.pt")],
                                 plain))
                    needs[m] = f"pretrain/{sub}"
                for name, path in s.inits.items():
                    arms.append((name, "", ["--backbone", path], plain))
                if s.controls:
                    arms.append((POSITIVE_CONTROL, self.default_arch,
                                 ["--backbone", str(s.out / "pretrain" / POSITIVE_CONTROL)], plain))
                    needs[POSITIVE_CONTROL] = f"pretrain/{POSITIVE_CONTROL}"
                    arms.append((NEGATIVE_CONTROL, self.default_arch, ["--backbone", "scratch", "--arch",
                                                                        self.default_arch], plain))
                frac = ["--label-fraction", str(fraction)] if fraction < 1.0 else []
                for name, arch, args, steps in arms:
                    offset = NEGATIVE_SEED_OFFSET if name == NEGATIVE_CONTROL else 0
                    for seed in range(offset, offset + s.seeds):
                        key = f"finetune/{task}/{fraction_tag(fraction)}/{name}/seed{seed}"
                        # the overrides go before the arm's own (scratch+ sets its trainer.max_steps last)
                        runs.append(Run(key, "finetune", "finetune.py",
                                        [*self.task_args(task), *frac, "--seed", str(seed), *s.overrides, *args],
                                        s.out / key, arch, steps, f"probe/{task}/{arch or self.default_arch}",
                                        needs.get(name, ""), val_every))
        return runs, info

    def seconds(self, run: Run, probes: dict[str, Run]) -> float:
        """Estimated seconds of a run from its probe's measurements: start-up (the probe's process time outside
        its training), steps x (step + wait for data), and each validation (the probe's, extrapolated from the
        batches it ran to the whole val loader)."""
        probe = probes[run.probe]
        c = probe.compute()
        started = (read_json(probe.out / "launch.json") or {}).get("process_seconds")
        seconds = max(float(started) - float(c["wall_seconds"]), 0.0) if started else 0.0
        seconds += run.steps * self.per_step(probe)[1]
        if run.val_every and c.get("validation_seconds") and c.get("validation_batches"):
            whole = c.get("val_loader_batches") or c["validation_batches"]
            seconds += run.steps // run.val_every * c["validation_seconds"] * whole / c["validation_batches"]
        return seconds

    # ---- results -----------------------------------------------------------------------------------
    def results(self, runs: list[Run]) -> list[ArmResult]:
        rows: list[ArmResult] = []
        pretrain = {r.key.removeprefix("pretrain/"): r for r in runs if r.kind == "pretrain"}
        for task in self.s.tasks:
            for fraction in self.s.label_fractions:
                prefix = f"finetune/{task}/{fraction_tag(fraction)}/"
                values: dict[str, list[float]] = {}
                archs: dict[str, str] = {}
                costs: dict[str, dict[str, float | None]] = {}
                for r in runs:
                    if not r.key.startswith(prefix) or not r.done():
                        continue
                    arm = r.key[len(prefix):].rsplit("/", 1)[0]
                    try:
                        value = headline(read_json(r.out / "results.json"), task)
                    except (KeyError, TypeError, ValueError):
                        raise UserError(f"{r.out / 'results.json'}: no {task} metric in it (not a finished "
                                        "fine-tuning's results); delete that run's folder to run it again") from None
                    values.setdefault(arm, []).append(value)
                    archs[arm] = r.arch or read_arch(r.out)
                    c = costs.setdefault(arm, {"finetune_flops": 0.0})
                    c["finetune_flops"] = (c["finetune_flops"] or 0.0) + (r.compute().get("total_flops") or 0.0)
                for arm, c in costs.items():
                    c["finetune_flops"] = (c["finetune_flops"] or 0.0) / len(values[arm])
                    sub = pretrain_name(arm, fraction)
                    if sub in pretrain:
                        pc = pretrain[sub].compute()
                        c["pretrain_flops"], c["pretrain_seconds"] = pc.get("total_flops"), pc.get("wall_seconds")
                rows += summarise(values, task, fraction, archs, costs)
        return rows


def read_arch(run_dir: Path) -> str:
    """The architecture a finished fine-tuning run trained (its saved config)."""
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.load(run_dir / "config.yaml").model.arch)
    except (OSError, AttributeError):
        return ""
