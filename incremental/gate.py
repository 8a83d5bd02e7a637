"""The quality gate: decides whether a candidate may replace its parent. Pure: no I/O.

`decide` compares per-snapshot scores of the candidate and its parent, computed on the same
held-out examples, and fails closed: a crashed evaluation, an empty or mismatched eval set, or a
missing or non-finite metric rejects the candidate with the reason spelled out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from incremental.config import GatePolicy


class Verdict(str, Enum):
    ACCEPT = "accept"
    REJECT = "reject"


@dataclass(frozen=True)
class EvalScores:
    """One model's scores on one eval snapshot; `error` is set when the evaluation crashed."""

    snapshot_hash: str
    n_examples: int
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    checks: tuple[Check, ...]

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT

    @property
    def reasons(self) -> tuple[str, ...]:
        """Failed checks first: the first reason is the one a user needs."""
        failed = [c.reason for c in self.checks if not c.passed]
        passed = [c.reason for c in self.checks if c.passed]
        return tuple(failed + passed)


@dataclass(frozen=True)
class _MetricRule:
    name: str
    label: str
    higher_is_better: bool
    margin_field: str  # the GatePolicy field that holds the allowed regression


# The gated metrics, in the order their reasons are reported.
GATED_METRICS: tuple[_MetricRule, ...] = (
    _MetricRule("target_nll", "target NLL", higher_is_better=False, margin_field="max_nll_increase"),
    _MetricRule("prompt_gain", "prompt gain", higher_is_better=True, margin_field="max_prompt_gain_drop"),
)


def decide(candidate: EvalScores | None, parent: EvalScores | None, policy: GatePolicy) -> Decision:
    """Accept the candidate only if every check passes; any doubt rejects."""
    checks: list[Check] = []
    for role, scores in (("candidate", candidate), ("parent", parent)):
        if scores is None:
            checks.append(Check("evaluation", False, f"no {role} scores: the evaluation did not run"))
        elif scores.error is not None:
            checks.append(Check("evaluation", False, f"{role} evaluation failed: {scores.error}"))
    if checks:
        return Decision(Verdict.REJECT, tuple(checks))
    assert candidate is not None and parent is not None

    checks.append(_check_eval_set(candidate, parent, policy))
    checks.extend(_check_metric(rule, candidate, parent, policy) for rule in GATED_METRICS)
    verdict = Verdict.ACCEPT if all(c.passed for c in checks) else Verdict.REJECT
    return Decision(verdict, tuple(checks))


def _check_eval_set(candidate: EvalScores, parent: EvalScores, policy: GatePolicy) -> Check:
    if candidate.snapshot_hash != parent.snapshot_hash or candidate.n_examples != parent.n_examples:
        return Check(
            "eval_set",
            False,
            "candidate and parent were scored on different eval snapshots "
            f"({candidate.snapshot_hash[:12]} vs {parent.snapshot_hash[:12]}): not comparable",
        )
    if candidate.n_examples < policy.min_eval_examples:
        return Check(
            "eval_set",
            False,
            f"only {candidate.n_examples} held-out examples (need at least {policy.min_eval_examples}): "
            "collect more feedback before promoting",
        )
    return Check("eval_set", True, f"{candidate.n_examples} held-out examples, same snapshot for both")


def _check_metric(rule: _MetricRule, candidate: EvalScores, parent: EvalScores, policy: GatePolicy) -> Check:
    cand, par = candidate.metrics.get(rule.name), parent.metrics.get(rule.name)
    for role, value in (("candidate", cand), ("parent", par)):
        if value is None:
            return Check(rule.name, False, f"{rule.label} missing for the {role}")
        if not math.isfinite(value):
            return Check(rule.name, False, f"{rule.label} of the {role} is {value}, not a finite number")
    assert cand is not None and par is not None
    margin: float = getattr(policy, rule.margin_field)
    regression = (par - cand) if rule.higher_is_better else (cand - par)
    passed = regression <= margin
    direction = "fell" if rule.higher_is_better else "rose"
    change = f"{direction} by {regression:.4f}" if regression > 0 else f"improved by {-regression:.4f}"
    reason = f"{rule.label} {cand:.4f} vs parent {par:.4f}: {change} (allowed regression {margin:g})"
    if not passed and rule.name == "prompt_gain":
        reason += "; the candidate relies less on the meeting notes"
    return Check(rule.name, passed, reason)
