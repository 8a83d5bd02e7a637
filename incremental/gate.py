"""The quality gate: decides whether a candidate may replace its parent. Pure: no I/O.

`decide` reads per-example scores of candidate and parent on the same eval rows, sliced by trust,
and judges each gated metric with a paired bootstrap interval against a non-inferiority margin.
The rules judge trusted rows (`regression`: arrived before the parent was accepted) and a user's
`golden` file; rows that arrived with the batch (`new`) are reported, never trusted. A first
version has no trusted rows and is judged against the base model on `all` eval rows. It fails
closed: a crashed evaluation, mismatched rows, a missing or non-finite score reject the candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from incremental.config import GatePolicy, MetricRule
from incremental.statistics import paired_bootstrap, seed_for

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
    """One (metric, slice) judgement, or a precondition (`metric` is 'evaluation' / 'eval_set')."""

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

    @property
    def passed(self) -> bool:
        return self.outcome in (Outcome.PASS, Outcome.REPORTED)

    def as_record(self) -> dict:
        return {
            "metric": self.metric, "slice": self.slice, "outcome": self.outcome.value, "gated": self.gated,
            "n": self.n, "candidate": self.candidate, "parent": self.parent, "delta": self.delta,
            "low": self.low, "high": self.high, "margin": self.margin, "reason": self.reason,
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
    checks: list[Check] = []
    for spec in METRICS:
        rule: MetricRule = getattr(policy, spec.name)
        for slice_ in SLICES:
            paired = evidence.scores.get((spec.name, slice_))
            if paired is None or not paired.ids:
                continue
            gated = rule.gated and slice_ in judged
            checks.append(_judge(spec, rule, slice_, paired, gated, evidence.snapshot_hash, policy))
        if spec.required and rule.gated:
            has_evidence = any(
                c.metric == spec.name and c.slice in judged and c.outcome is not Outcome.TOO_FEW for c in checks
            )
            if not has_evidence:
                checks.append(
                    Check(
                        spec.name, "+".join(judged), Outcome.TOO_FEW, True,
                        f"{spec.label}: fewer than {policy.min_eval_examples} trusted eval rows "
                        f"({' or '.join(judged)}): nothing to judge on yet; collect more feedback, or lower "
                        "gate.min_eval_examples",
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
    return paired.candidate.shape == (n,) and paired.parent.shape == (n,) and paired.weights.shape == (n,)


def _judge(
    spec: MetricSpec, rule: MetricRule, slice_: str, paired: PairedScores, gated: bool, snapshot: str, policy: GatePolicy
) -> Check:
    where = f"{spec.label} on {slice_} rows"
    bad = [
        role
        for role, values in (("candidate", paired.candidate), ("parent", paired.parent), ("weights", paired.weights))
        if not np.all(np.isfinite(values))
    ]
    if bad:
        return Check(spec.name, slice_, Outcome.FAIL, gated, f"{where}: the {' and '.join(bad)} scores are not all finite numbers", len(paired.ids))
    n = len(paired.ids)
    if gated and n < policy.min_eval_examples:
        return Check(
            spec.name, slice_, Outcome.TOO_FEW, False,
            f"{where}: only {n} rows (need {policy.min_eval_examples}); not judged",
            n,
        )  # fmt: skip
    interval = paired_bootstrap(
        paired.candidate, paired.parent, paired.weights,
        seed=seed_for(snapshot, spec.name, slice_), confidence=policy.confidence, resamples=policy.bootstrap_resamples,
    )  # fmt: skip
    sign = -1.0 if spec.higher_is_better else 1.0  # regression = the change in the bad direction
    low, high = sorted((sign * interval.low, sign * interval.high))
    margin = max(rule.margin, rule.relative_margin * abs(interval.parent))
    if not gated:
        outcome = Outcome.REPORTED
    elif high <= margin:
        outcome = Outcome.PASS
    elif low > margin:
        outcome = Outcome.FAIL
    else:
        outcome = Outcome.INCONCLUSIVE
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    words = {
        Outcome.PASS: "no regression beyond the margin",
        Outcome.FAIL: "regressed beyond the margin",
        Outcome.INCONCLUSIVE: "the interval straddles the margin: inconclusive",
        Outcome.REPORTED: "reported, not gated" if slice_ != NEW else "reported only: these rows arrived with the batch",
    }[outcome]
    reason = (
        f"{where} ({direction}, n={n}): candidate {interval.candidate:.4f} vs parent {interval.parent:.4f}, "
        f"change {interval.difference:+.4f}, {interval.confidence:.0%} interval [{interval.low:+.4f}, {interval.high:+.4f}]; "
        f"allowed regression {margin:.4f}: {words}"
    )
    if outcome is Outcome.FAIL and spec.name == "prompt_gain":
        reason += "; the candidate relies less on the meeting notes"
    return Check(
        spec.name, slice_, outcome, gated, reason, n, interval.candidate, interval.parent, interval.difference,
        interval.low, interval.high, margin,
    )  # fmt: skip


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
