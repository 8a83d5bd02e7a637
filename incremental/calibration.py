"""Gate calibration: how much the gate's numbers move for reasons that have nothing to do with the model.

The current version is scored against itself on the rows its next candidate will be judged on. The
bootstrap is run with two seeds, and generation uses two disjoint greedy samples of rows; how far
each metric's interval moves between them is the noise that has nothing to do with any model. The
version's own promotion adds how wide a real paired interval was. The larger of the two is the floor. A margin below that floor makes clean
candidates inconclusive by chance, and a recorded verdict whose interval ends within the floor of
its margin could have gone the other way. Knows nothing about the database or Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from incremental.config import GatePolicy
from incremental.evaluation import per_example_table, plan_evaluation, score_model
from incremental.gate import ALL, METRICS, REGRESSION, judged_slices
from incremental.statistics import paired_bootstrap, seed_for

__all__ = ["CalibrationReport", "MetricNoise", "calibrate", "flip_risks"]


@dataclass(frozen=True)
class MetricNoise:
    metric: str
    n: int
    value: float
    interval_a: tuple[float, float]  # bootstrap interval of the version's mean, seed A
    interval_b: tuple[float, float]  # the same, seed B
    sample_b: float | None  # generation metrics: the value on a second, disjoint greedy sample
    margin: float
    gated: bool
    resolution: float | None = None  # half-width of this metric's paired interval when the version was promoted


    @property
    def seed_noise(self) -> float:
        return max(abs(self.interval_a[0] - self.interval_b[0]), abs(self.interval_a[1] - self.interval_b[1]))

    @property
    def sample_noise(self) -> float:
        return 0.0 if self.sample_b is None else abs(self.value - self.sample_b)

    @property
    def floor(self) -> float:
        """How far the gate's numbers move with the seed and the sample alone, or, when larger, how
        wide a real candidate-minus-parent interval was (the version's own promotion)."""
        return max(self.seed_noise + self.sample_noise, self.resolution or 0.0)

    @property
    def margin_ok(self) -> bool:
        return self.margin > self.floor


@dataclass(frozen=True)
class CalibrationReport:
    version: str
    slice: str
    metrics: tuple[MetricNoise, ...]


def calibrate(
    model, tokenizer, eval_table: pa.Table, policy: GatePolicy, *, version: str, max_length: int, prompt_layout: int,
    promotion_scores: pa.Table | None = None,
) -> CalibrationReport:
    """Score `model` (the current version, prompted in its `prompt_layout`) on `eval_table` (a dataset plan's eval rows) twice over.

    The rows are sliced as they will be for the next candidate; generation runs on the first
    `generation_rows` judged rows (sample A) and on the next as many (sample B). `promotion_scores`
    (the version's own scores.parquet) adds how wide its paired intervals were when it was judged.
    """
    resolutions = promotion_resolution(promotion_scores, policy) if promotion_scores is not None else {}
    sample_size = policy.generation_rows
    plan = plan_evaluation(
        eval_table, first_version=False, snapshot_hash=f"calibrate:{version}", generation_rows=2 * sample_size,
        partners_per_row=policy.prompt_gain_partners,
    )  # fmt: skip
    # Two disjoint samples of the same size per artifact type: the first `generation_rows` of each type, then the next.
    type_of = dict(zip(plan.rows.column("id").to_pylist(), plan.rows.column("artifact_type").to_pylist()))
    seen: dict[str, int] = {}
    sample_a, sample_b = [], []
    for row_id in plan.generation_ids:
        seen[type_of[row_id]] = seen.get(type_of[row_id], 0) + 1
        (sample_a if seen[type_of[row_id]] <= sample_size else sample_b).append(row_id)
    scores, _ = score_model(
        model, tokenizer, plan, max_length=max_length, max_new_tokens=policy.max_new_tokens, prompt_layout=prompt_layout
    )
    table = per_example_table(plan, scores, scores)
    judged = judged_slices(False)[0]
    noises = []
    for spec in METRICS:
        mask = pc.and_(pc.equal(table.column("metric"), spec.name), pc.equal(table.column("slice"), judged))
        rows = table.filter(mask)
        if rows.num_rows < 2:
            continue
        ids = rows.column("id").to_pylist()
        values = rows.column("candidate").to_numpy(zero_copy_only=False)
        weights = rows.column("weight").to_numpy(zero_copy_only=False)
        in_a = np.array([row_id in set(sample_a) for row_id in ids]) if spec.name in _GENERATED else np.ones(len(ids), bool)
        if not in_a.any():
            continue
        zeros = np.zeros(int(in_a.sum()))
        intervals = [
            paired_bootstrap(values[in_a], zeros, weights[in_a], seed=seed_for(version, spec.name, seed),
                             confidence=policy.confidence, resamples=policy.bootstrap_resamples)
            for seed in ("calibration-a", "calibration-b")
        ]  # fmt: skip
        sample_b_value = None
        if spec.name in _GENERATED:
            in_b = np.array([row_id in set(sample_b) for row_id in ids])
            if in_b.any():
                sample_b_value = float(np.average(values[in_b], weights=weights[in_b]))
        rule = getattr(policy, spec.name)
        noises.append(
            MetricNoise(
                metric=spec.name, n=int(in_a.sum()), value=intervals[0].candidate,
                interval_a=(intervals[0].low, intervals[0].high), interval_b=(intervals[1].low, intervals[1].high),
                sample_b=sample_b_value, margin=max(rule.margin, rule.relative_margin * abs(intervals[0].candidate)),
                gated=rule.gated, resolution=resolutions.get(spec.name),
            )
        )  # fmt: skip
    return CalibrationReport(version=version, slice=judged, metrics=tuple(noises))


def promotion_resolution(scores: pa.Table, policy: GatePolicy) -> dict[str, float]:
    """Half-width of each metric's paired interval on the slice a version was judged on (its scores.parquet)."""
    slices = set(scores.column("slice").to_pylist())
    judged = ALL if ALL in slices else REGRESSION
    out = {}
    for spec in METRICS:
        rows = scores.filter(pc.and_(pc.equal(scores.column("metric"), spec.name), pc.equal(scores.column("slice"), judged)))
        if rows.num_rows < 2:
            continue
        interval = paired_bootstrap(
            rows.column("candidate").to_numpy(zero_copy_only=False), rows.column("parent").to_numpy(zero_copy_only=False),
            rows.column("weight").to_numpy(zero_copy_only=False), seed=seed_for("resolution", spec.name),
            confidence=policy.confidence, resamples=policy.bootstrap_resamples,
        )  # fmt: skip
        out[spec.name] = (interval.high - interval.low) / 2
    return out


def flip_risks(report: CalibrationReport, checks: list[dict]) -> list[str]:
    """Recorded gated checks (a manifest's) whose interval ends within the noise floor of their margin."""
    floors = {noise.metric: noise.floor for noise in report.metrics}
    risks = []
    for check in checks:
        if not check.get("gated") or check.get("high") is None or check["metric"] not in floors:
            continue
        sign = -1.0 if _higher_is_better(check["metric"]) else 1.0
        low, high = sorted((sign * check["low"], sign * check["high"]))
        nearest = min(abs(high - check["margin"]), abs(low - check["margin"]))
        if nearest <= floors[check["metric"]]:
            risks.append(
                f"{check['metric']} on {check['slice']} rows ({check['outcome']}): its interval ends {nearest:.4f} from the "
                f"margin {check['margin']:.4f}, within the noise floor {floors[check['metric']]:.4f}: it could have gone the other way"
            )
    return risks


_GENERATED = {"artifact_validity", "content_f1"}


def _higher_is_better(metric: str) -> bool:
    return next(spec.higher_is_better for spec in METRICS if spec.name == metric)
