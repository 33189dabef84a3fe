"""The bake-off's verdicts: mean and 95% interval per arm over seeds, the seed-paired difference of every
pre-trained arm to the scratch of its own architecture (``scratch+`` at equal total compute: the verdict;
plain ``scratch`` beside it), and the protocol's controls (issue #12 §1) judged against plain scratch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cheaplunch.stats import TIE, Interval, paired_difference, t_interval, verdict

HEADLINE = {"detection": ("bbox", "AP"), "segmentation": ("mIoU",)}  # the metric a task is judged on
# The controls: a backbone pre-trained with --control-factor times the budget must beat scratch by more than
# POSITIVE_MARGIN seed standard deviations; scratch with other seeds must tie with scratch.
POSITIVE_CONTROL, NEGATIVE_CONTROL = "control_long", "control_scratch"
POSITIVE_MARGIN = 3.0
UNPAIRED = "no verdict"  # the arm and its scratch+ have different numbers of seeds


def headline(results: dict[str, Any], task: str) -> float:
    value: Any = results
    for part in HEADLINE[task]:
        value = value[part]
    return float(value)


@dataclass
class ArmResult:
    task: str
    fraction: float
    arm: str
    arch: str
    values: list[float]
    interval: Interval
    pretrain_flops: float | None = None
    pretrain_seconds: float | None = None
    finetune_flops: float | None = None
    vs_scratch_equal: Interval | None = None
    vs_scratch_plain: Interval | None = None
    verdict: str | None = None
    control: str | None = None  # positive | negative (the protocol's controls), else None
    control_passed: bool | None = None
    control_threshold: float | None = None  # positive control: the gain it needs (POSITIVE_MARGIN x seed SD, see judge_control)

    @property
    def total_flops(self) -> float:
        return (self.pretrain_flops or 0.0) + (self.finetune_flops or 0.0)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_flops"] = self.total_flops
        return d


def summarise(values: dict[str, list[float]], task: str, fraction: float, archs: dict[str, str],
              costs: dict[str, dict[str, float | None]]) -> list[ArmResult]:
    """Mean and interval per arm; for every other arm, the seed-paired difference to its architecture's
    scratch+ (the verdict) and scratch. The controls are judged against plain scratch (same fine-tuning)."""
    rows = []
    for arm, vals in values.items():
        c = costs.get(arm, {})
        row = ArmResult(task, fraction, arm, archs.get(arm, ""), vals, t_interval(vals), c.get("pretrain_flops"),
                        c.get("pretrain_seconds"), c.get("finetune_flops"))
        if not arm.startswith("scratch"):
            is_control = arm in (POSITIVE_CONTROL, NEGATIVE_CONTROL)
            same = [a for a in values if a.startswith("scratch") and archs.get(a) == archs.get(arm)]
            equal = next((a for a in same if a.startswith("scratch+")), None)
            plain = next((a for a in same if not a.startswith("scratch+")), None)
            if equal and not is_control:
                if len(values[equal]) == len(vals):
                    row.vs_scratch_equal = paired_difference(vals, values[equal])
                    row.verdict = verdict(row.vs_scratch_equal)
                else:  # said in the row, not dropped: a run of one arm is missing, so seeds cannot be paired
                    row.verdict = f"{UNPAIRED}: {len(vals)} seeds vs {len(values[equal])} of {equal}"
            if plain and len(values[plain]) == len(vals):
                row.vs_scratch_plain = paired_difference(vals, values[plain])
                if is_control:
                    scratch_runs = values[plain]
                    if arm == POSITIVE_CONTROL and archs.get(NEGATIVE_CONTROL) == archs.get(arm):
                        # the seed SD from every scratch run of this architecture: the negative control's too
                        scratch_runs = scratch_runs + values.get(NEGATIVE_CONTROL, [])
                    judge_control(row, scratch_runs)
        rows.append(row)
    return rows


def judge_control(row: ArmResult, scratch: list[float]) -> None:
    """Positive control: passes when its paired gain over scratch exceeds POSITIVE_MARGIN seed standard deviations
    (the larger of its own sample SD and that of `scratch`, every scratch run of its architecture: an SD from 3
    seeds alone is uncertain by a factor of 3), i.e. the protocol can see a real pre-training gain. Negative
    control (scratch, other seeds): passes when the paired interval says tie, i.e. seeds alone make no verdict."""
    assert row.vs_scratch_plain is not None
    row.verdict = verdict(row.vs_scratch_plain)
    if row.arm == POSITIVE_CONTROL:
        row.control = "positive"
        row.control_threshold = POSITIVE_MARGIN * max(row.interval.sd, t_interval(scratch).sd)
        row.control_passed = row.vs_scratch_plain.mean > row.control_threshold and row.interval.n > 1
    else:
        row.control = "negative"
        row.control_passed = row.verdict == TIE and row.interval.n > 1  # one seed has no interval: it proves nothing
