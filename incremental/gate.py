"""The quality gate: decides whether a candidate may replace its parent. Pure: no I/O.

`decide` reads per-example scores of candidate and parent on the same eval rows, sliced by trust,
and judges each gated metric with a paired bootstrap interval against a non-inferiority margin.
The rules judge trusted rows (`regression`: arrived before the parent was accepted) and a user's
`golden` file; rows that arrived with the batch (`new`) are reported, never trusted. A first
version has no trusted rows and is judged against the base model on `all` eval rows. It fails
closed: a crashed evaluation, mismatched rows, a missing or non-finite score reject the candidate.

Every gated metric is judged pooled over artifact types and, where a judged slice holds several
types, per type as well: a regression on one type fails the gate even when another type improves.
With that many guardrails the rule is the one clinical trials use for co-primary endpoints: a
candidate is accepted only if every guardrail passes, each at the policy's level, which is an
intersection-union test and needs no adjustment for the number of guardrails (Berger 1982; Berger &
Hsu 1996; FDA, "Multiple Endpoints in Clinical Trials", 2022, on co-primary endpoints; Spotify's
decision rule, Schultzberg, Ankargren & Frånberg 2024, arXiv 2402.11609, for guardrail metrics). Failing, which holds the
batch for a person, is a claim about one guardrail among many, so it is Bonferroni-adjusted: the
chance that some guardrail fails a candidate that regressed on none stays under the one-sided level.
Following the same rule, a check is either a non-inferiority guardrail (it must be shown within its
margin: the pooled likelihoods by default) or a deterioration test (it blocks only a clear regression
beyond its margin: each artifact type, and validity and content F1, which a few dozen rows cannot
show non-inferior while the model still changes its outputs). A check that cannot decide says how
many more trusted rows would let it (its power).
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from incremental.config import GatePolicy, MetricRule
from incremental.statistics import paired_bootstrap, seed_for, weighted_mean

__all__ = [
    "METRICS",
    "SLICES",
    "Check",
    "Decision",
    "GateEvidence",
    "MetricSpec",
    "Outcome",
    "PairedScores",
    "Verdict",
    "decide",
    "judged_slices",
]

REGRESSION, NEW, GOLDEN, ALL = "regression", "new", "golden", "all"
SLICES = (REGRESSION, GOLDEN, ALL, NEW)


class Verdict(str, Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    INCONCLUSIVE = "inconclusive"


class Outcome(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    TOO_FEW = "too few rows"
    NOT_SHOWN_WORSE = "not shown worse"  # a deterioration test whose interval straddles its margin: does not block
    REPORTED = "reported"  # not gated: computed for the record


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    higher_is_better: bool
    required: bool  # a judged slice must have enough rows for it, else the verdict is inconclusive


# The metrics, in the order their reasons are reported; values are per example, weights alongside.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("target_nll", "target NLL", higher_is_better=False, required=True),
    MetricSpec("prompt_gain", "prompt gain", higher_is_better=True, required=True),
    MetricSpec("preference_margin", "preference margin (correction over rejected output)", higher_is_better=True, required=False),
    MetricSpec("rejected_nll", "NLL of rejected outputs", higher_is_better=True, required=False),
    MetricSpec("artifact_validity", "artifact validity", higher_is_better=True, required=False),
    MetricSpec("content_f1", "content F1", higher_is_better=True, required=False),
)
_SPECS = {spec.name: spec for spec in METRICS}


@dataclass(frozen=True)
class PairedScores:
    """One metric on one slice: per-example values of candidate and parent on the same rows, in one order."""

    ids: tuple[str, ...]
    candidate: np.ndarray
    parent: np.ndarray
    weights: np.ndarray
    types: tuple[str, ...] | None = None  # each example's artifact type, where known
    artifact_type: str | None = None  # set on the examples of one type (`of_type`); None: pooled

    def of_type(self, name: str) -> PairedScores:
        """The examples of one artifact type."""
        keep = np.array([t == name for t in self.types or ()], dtype=bool)
        ids = tuple(i for i, k in zip(self.ids, keep) if k)
        return PairedScores(ids, self.candidate[keep], self.parent[keep], self.weights[keep], (name,) * len(ids), name)


@dataclass(frozen=True)
class GateEvidence:
    """Everything the gate reads. `scores` maps (metric, slice) to paired per-example values.

    `first_version` means the parent is the bare base model: there are no trusted rows yet, and the
    `all` slice is judged. `error` is set when evaluation crashed.
    """

    snapshot_hash: str
    first_version: bool
    scores: Mapping[tuple[str, str], PairedScores] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Check:
    """One (metric, slice[, artifact type]) judgement, or a precondition (`metric` is 'evaluation' / 'eval_set')."""

    metric: str
    slice: str
    outcome: Outcome
    gated: bool
    reason: str
    n: int = 0
    candidate: float | None = None
    parent: float | None = None
    delta: float | None = None  # candidate - parent
    low: float | None = None  # interval of the delta
    high: float | None = None
    margin: float | None = None  # allowed regression, in the metric's bad direction
    group: str | None = None  # the artifact type judged; None: pooled over all types
    more_rows: int | None = None  # power: about how many more rows would let an undecided check decide

    @property
    def where(self) -> str:
        """'regression' or 'regression · erd': the slice, and the artifact type when judged per type."""
        return self.slice if self.group is None else f"{self.slice} · {self.group}"

    @property
    def passed(self) -> bool:
        return self.outcome in (Outcome.PASS, Outcome.REPORTED, Outcome.NOT_SHOWN_WORSE)

    def as_record(self) -> dict:
        return {
            "metric": self.metric, "slice": self.slice, "outcome": self.outcome.value, "gated": self.gated,
            "n": self.n, "candidate": self.candidate, "parent": self.parent, "delta": self.delta,
            "low": self.low, "high": self.high, "margin": self.margin, "reason": self.reason,
            "group": self.group, "more_rows": self.more_rows,
        }  # fmt: skip


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    checks: tuple[Check, ...]
    promote: bool  # ACCEPT, or INCONCLUSIVE under a policy that promotes anyway

    @property
    def accepted(self) -> bool:
        return self.promote

    @property
    def blames_batch(self) -> bool:
        """The evidence (not a crash, not too few rows) shows the candidate regressed: a gated metric
        failed beyond its margin. The batch that trained the candidate is then held for a person, so it
        does not come back as new every night; when the promotion happened anyway, nothing is held."""
        if self.promote:
            return False
        return any(c.gated and c.outcome is Outcome.FAIL and c.metric in _SPECS for c in self.checks)

    @property
    def undecided(self) -> bool:
        """The parent stays because the evidence is not strong enough either way (an interval straddles
        its margin, or too few trusted rows), not because a metric failed: "not sure yet" is not "no",
        so the batch waits for more evidence instead of being held (see `RunConfig.gate.max_waits`)."""
        return not self.promote and self.verdict is Verdict.INCONCLUSIVE and not self.blames_batch

    @property
    def reasons(self) -> tuple[str, ...]:
        """Deciding checks first (failed, then inconclusive), then the rest: the first is the one a user needs."""
        rank = {Outcome.FAIL: 0, Outcome.INCONCLUSIVE: 1, Outcome.TOO_FEW: 1}
        ordered = sorted(self.checks, key=lambda c: rank.get(c.outcome, 2) if c.gated else 3)
        return tuple(c.reason for c in ordered)


def judged_slices(first_version: bool) -> tuple[str, ...]:
    return (ALL, GOLDEN) if first_version else (REGRESSION, GOLDEN)


def decide(evidence: GateEvidence | None, policy: GatePolicy) -> Decision:
    """Accept only if every gated metric passes on every judged slice; any doubt keeps the parent."""
    if evidence is None:
        return _closed("no scores: the evaluation did not run")
    if evidence.error is not None:
        return _closed(f"evaluation failed: {evidence.error}")
    mismatched = [
        f"{metric}/{slice_}" for (metric, slice_), paired in evidence.scores.items() if not _well_formed(paired)
    ]
    if mismatched:
        return _closed(
            f"candidate and parent were not scored on the same rows for {', '.join(sorted(mismatched))}: not comparable"
        )
    judged = judged_slices(evidence.first_version)
    planned = _guardrails(evidence, policy, judged)
    # Bonferroni for failing (see the module's docstring): one level for every guardrail judged.
    n_judged = sum(1 for spec, _, _, paired, gated in planned if gated and len(paired.ids) >= _min_rows(spec, paired, policy))
    fail_confidence = 1.0 - (1.0 - policy.confidence) / max(1, n_judged)
    checks: list[Check] = [
        _judge(spec, rule, slice_, paired, gated, evidence.snapshot_hash, policy, fail_confidence)
        for spec, rule, slice_, paired, gated in planned
    ]
    for spec in METRICS:
        rule = getattr(policy, spec.name)
        if spec.required and rule.gated:
            has_evidence = any(
                c.metric == spec.name and c.slice in judged and c.group is None and c.outcome is not Outcome.TOO_FEW
                for c in checks
            )
            if not has_evidence:
                n = max((c.n for c in checks if c.metric == spec.name and c.slice in judged and c.group is None), default=0)
                checks.append(
                    Check(
                        spec.name, "+".join(judged), Outcome.TOO_FEW, True,
                        f"{spec.label}: fewer than {policy.min_eval_examples} trusted eval rows "
                        f"({' or '.join(judged)}): nothing to judge on yet; collect more feedback, or lower "
                        "gate.min_eval_examples",
                        more_rows=policy.min_eval_examples - n,
                    )
                )  # fmt: skip
    if policy.new_rows_must_improve:
        checks.append(_must_improve(evidence, policy))
    gated = [c for c in checks if c.gated]
    if any(c.outcome is Outcome.FAIL for c in gated):
        verdict = Verdict.REJECT
    elif any(c.outcome in (Outcome.INCONCLUSIVE, Outcome.TOO_FEW) for c in gated):
        verdict = Verdict.INCONCLUSIVE
    else:
        verdict = Verdict.ACCEPT
    # A first version has no fine-tuned behaviour to protect and no trusted rows to judge on; its
    # intervals against the base are wide (a large change, few rows), so by default only a failed
    # rule keeps the base model. Too few rows to judge at all never promotes a first version.
    if evidence.first_version:
        too_few = any(c.outcome is Outcome.TOO_FEW for c in gated)
        on_inconclusive = "keep_parent" if too_few else policy.first_version_on_inconclusive
    else:
        on_inconclusive = policy.on_inconclusive
    promote = verdict is Verdict.ACCEPT or (verdict is Verdict.INCONCLUSIVE and on_inconclusive == "promote")
    return Decision(verdict, tuple(checks), promote)


def _closed(reason: str) -> Decision:
    return Decision(Verdict.REJECT, (Check("evaluation", "-", Outcome.FAIL, True, reason),), promote=False)


def _well_formed(paired: PairedScores) -> bool:
    n = len(paired.ids)
    types_fit = paired.types is None or len(paired.types) == n
    return paired.candidate.shape == (n,) and paired.parent.shape == (n,) and paired.weights.shape == (n,) and types_fit


def _guardrails(
    evidence: GateEvidence, policy: GatePolicy, judged: tuple[str, ...]
) -> list[tuple[MetricSpec, MetricRule, str, PairedScores, bool]]:
    """Every (metric, slice) with scores, pooled; on judged slices of gated metrics also each artifact
    type, when the slice holds more than one (a lone type's check would repeat the pooled one)."""
    planned = []
    for spec in METRICS:
        rule: MetricRule = getattr(policy, spec.name)
        for slice_ in SLICES:
            paired = evidence.scores.get((spec.name, slice_))
            if paired is None or not paired.ids:
                continue
            gated = rule.gated and slice_ in judged
            planned.append((spec, rule, slice_, paired, gated))
            types = sorted(set(paired.types or ()))
            if gated and len(types) > 1:
                planned += [(spec, rule, slice_, paired.of_type(name), gated) for name in types]
    return planned


_GENERATED = frozenset({"artifact_validity", "content_f1"})


def _min_rows(spec: MetricSpec, paired: PairedScores, policy: GatePolicy) -> int:
    """Rows a guardrail needs before it is judged: generation metrics are binary or coarse per row, so
    they need more than likelihoods do."""
    needed = policy.min_eval_examples if paired.artifact_type is None else policy.min_rows_per_type
    return max(needed, policy.min_generation_rows) if spec.name in _GENERATED else needed


def _judge(
    spec: MetricSpec, rule: MetricRule, slice_: str, paired: PairedScores, gated: bool, snapshot: str, policy: GatePolicy,
    fail_confidence: float,
) -> Check:
    group = paired.artifact_type
    where = f"{spec.label} on {slice_} rows" + ("" if group is None else f" of type {group}")
    bad = [
        role
        for role, values in (("candidate", paired.candidate), ("parent", paired.parent), ("weights", paired.weights))
        if not np.all(np.isfinite(values))
    ]
    if bad:
        return Check(spec.name, slice_, Outcome.FAIL, gated, f"{where}: the {' and '.join(bad)} scores are not all finite numbers", len(paired.ids), group=group)
    n = len(paired.ids)
    needed = _min_rows(spec, paired, policy)
    if gated and n < needed:
        # Not judged, but its means are kept: the report charts what users receive per type from them.
        candidate, parent = (weighted_mean(v, paired.weights) for v in (paired.candidate, paired.parent))
        return Check(
            spec.name, slice_, Outcome.TOO_FEW, False,
            f"{where}: only {n} rows (need {needed}); not judged yet: {needed - n} more would let the gate judge it",
            n, candidate, parent, candidate - parent, group=group, more_rows=needed - n,
        )  # fmt: skip
    seed = seed_for(snapshot, spec.name, slice_, *(() if group is None else (group,)))
    interval = paired_bootstrap(
        paired.candidate, paired.parent, paired.weights,
        seed=seed, confidence=policy.confidence, resamples=policy.bootstrap_resamples,
    )  # fmt: skip
    sign = -1.0 if spec.higher_is_better else 1.0  # regression = the change in the bad direction
    low, high = sorted((sign * interval.low, sign * interval.high))
    margin = max(rule.margin, rule.relative_margin * abs(interval.parent))
    fail_low = low
    if gated and low > margin and fail_confidence > policy.confidence:
        # Failing claims this guardrail regressed although many were looked at: the wider interval decides.
        wide = paired_bootstrap(
            paired.candidate, paired.parent, paired.weights,
            seed=seed, confidence=fail_confidence, resamples=policy.bootstrap_resamples,
        )  # fmt: skip
        fail_low = min(sign * wide.low, sign * wide.high)
    deterioration = (rule.test if group is None else policy.per_type_test) == "deterioration" or rule.test == "deterioration"
    more_rows = None
    if not gated:
        outcome = Outcome.REPORTED
    elif high <= margin:
        outcome = Outcome.PASS
    elif fail_low > margin:
        outcome = Outcome.FAIL
    else:
        outcome = Outcome.NOT_SHOWN_WORSE if deterioration else Outcome.INCONCLUSIVE
        more_rows = rows_to_decide(n, sign * interval.difference, low, high, margin)
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    words = {
        Outcome.PASS: "no regression beyond the margin",
        Outcome.FAIL: "regressed beyond the margin",
        Outcome.INCONCLUSIVE: "the interval straddles the margin: inconclusive",
        Outcome.NOT_SHOWN_WORSE: "the interval straddles the margin; a deterioration test blocks only a clear regression",
        Outcome.REPORTED: "reported, not gated" if slice_ != NEW else "reported only: these rows arrived with the batch",
    }[outcome]
    if outcome in (Outcome.INCONCLUSIVE, Outcome.NOT_SHOWN_WORSE) and low > margin:
        words = (
            f"beyond the margin at {policy.confidence:.0%}, but not at the {fail_confidence:.1%} a fail needs with "
            f"{_judged_count(policy, fail_confidence)} guardrails judged: "
            + ("inconclusive" if outcome is Outcome.INCONCLUSIVE else "not shown worse (a deterioration test)")
        )
    if outcome in (Outcome.INCONCLUSIVE, Outcome.NOT_SHOWN_WORSE):
        words += (
            f"; about {more_rows} more rows{'' if group is None else f' of type {group}'} would decide it if the change holds"
            if more_rows is not None
            else "; the change sits on the margin, so more rows alone will hardly decide it"
        )
    reason = (
        f"{where} ({direction}, n={n}): candidate {interval.candidate:.4f} vs parent {interval.parent:.4f}, "
        f"change {interval.difference:+.4f}, {interval.confidence:.0%} interval [{interval.low:+.4f}, {interval.high:+.4f}]; "
        f"allowed regression {margin:.4f}: {words}"
    )
    if outcome is Outcome.FAIL and spec.name == "prompt_gain":
        reason += "; the candidate relies less on the meeting notes"
    return Check(
        spec.name, slice_, outcome, gated, reason, n, interval.candidate, interval.parent, interval.difference,
        interval.low, interval.high, margin, group=group, more_rows=more_rows,
    )  # fmt: skip


def _judged_count(policy: GatePolicy, fail_confidence: float) -> int:
    return max(1, round((1.0 - policy.confidence) / (1.0 - fail_confidence)))


# Beyond this many times the rows already judged, "more rows" is no practical advice.
_MAX_GROWTH = 100


def rows_to_decide(n: int, regression: float, low: float, high: float, margin: float) -> int | None:
    """Power: about how many more rows an undecided guardrail needs before its interval clears the margin,
    if the change stays what it is. An interval's half-width shrinks as 1/sqrt(n), so n rows of half-width
    h decide once h * sqrt(n / n') is below the distance from the change to the margin. None: the change
    sits so near the margin that more than 100x the rows would be needed."""
    half_width = (high - low) / 2.0
    distance = abs(regression - margin)
    if half_width <= 0 or distance <= half_width / math.sqrt(_MAX_GROWTH):
        return None
    return max(1, math.ceil(n * (half_width / distance) ** 2) - n)


def _must_improve(evidence: GateEvidence, policy: GatePolicy) -> Check:
    """Policy rule on the untrusted slice: target NLL on the batch's own eval rows must fall clearly."""
    paired = evidence.scores.get(("target_nll", NEW))
    if paired is None or len(paired.ids) < policy.min_eval_examples:
        n = 0 if paired is None else len(paired.ids)
        return Check("target_nll", "new (must improve)", Outcome.TOO_FEW, True,
                     f"target NLL must improve on the batch's eval rows, but there are only {n} of them", n)  # fmt: skip
    interval = paired_bootstrap(
        paired.candidate, paired.parent, paired.weights,
        seed=seed_for(evidence.snapshot_hash, "target_nll", "new-must-improve"),
        confidence=policy.confidence, resamples=policy.bootstrap_resamples,
    )  # fmt: skip
    improved = interval.high < 0
    outcome = Outcome.PASS if improved else (Outcome.FAIL if interval.low >= 0 else Outcome.INCONCLUSIVE)
    reason = (
        f"target NLL on the batch's own eval rows must improve (n={interval.n}): change {interval.difference:+.4f}, "
        f"interval [{interval.low:+.4f}, {interval.high:+.4f}]: {'improved' if improved else 'not clearly improved'}"
    )
    return Check("target_nll", "new (must improve)", outcome, True, reason, interval.n, interval.candidate,
                 interval.parent, interval.difference, interval.low, interval.high, 0.0)  # fmt: skip
