"""The gate as a table of cases: paired per-example scores of candidate and parent, the expected verdict."""

import numpy as np
import pytest

from incremental.config import GatePolicy, MetricRule
from incremental.gate import GateEvidence, Outcome, PairedScores, Verdict, decide

POLICY = GatePolicy(min_eval_examples=8, bootstrap_resamples=1000)
RNG = np.random.default_rng(0)
NOISE = RNG.normal(0.0, 1.0, size=40)


def paired(parent, delta, n=None, noise=0.0, weights=None) -> PairedScores:
    """Parent values, candidate = parent + delta (+ per-example noise), unit weights unless given."""
    parent = np.asarray(parent, dtype=float) if np.ndim(parent) else np.full(n or 20, float(parent))
    n = parent.size
    candidate = parent + delta + noise * NOISE[:n]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    return PairedScores(tuple(f"r{i}" for i in range(n)), candidate, parent, w)


def evidence(first_version=False, snapshot="abc", **scores) -> GateEvidence:
    """scores: metric__slice=PairedScores, e.g. target_nll__regression=paired(1.5, -0.1)."""
    return GateEvidence(
        snapshot_hash=snapshot,
        first_version=first_version,
        scores={tuple(key.split("__")): value for key, value in scores.items()},
    )


def healthy(**extra) -> dict:
    """Both required metrics improving clearly on trusted rows."""
    return {"target_nll__regression": paired(1.5, -0.1), "prompt_gain__regression": paired(0.3, 0.02), **extra}


CASES = [
    # id, evidence, policy, verdict, promote, a phrase the first reason must contain
    ("better on both", evidence(**healthy()), POLICY, Verdict.ACCEPT, True, "no regression"),
    ("equal is not a regression", evidence(target_nll__regression=paired(1.5, 0.0), prompt_gain__regression=paired(0.3, 0.0)),
     POLICY, Verdict.ACCEPT, True, "no regression"),
    ("nll worse beyond margin", evidence(**healthy(target_nll__regression=paired(1.5, 0.1))), POLICY, Verdict.REJECT, False,
     "target NLL on regression rows"),
    ("noisy nll straddles the margin", evidence(**healthy(target_nll__regression=paired(1.5, 0.02, noise=0.3))), POLICY,
     Verdict.INCONCLUSIVE, False, "inconclusive"),
    ("inconclusive promotes when the policy says so",
     evidence(**healthy(target_nll__regression=paired(1.5, 0.02, noise=0.3))),
     POLICY.model_copy(update={"on_inconclusive": "promote"}), Verdict.INCONCLUSIVE, True, "inconclusive"),
    # Boundary: a constant regression exactly at the margin passes (<=), a hair above fails.
    ("regression exactly at the margin passes",
     evidence(**healthy(target_nll__regression=paired(1.0, 0.25))),
     POLICY.model_copy(update={"target_nll": MetricRule(margin=0.25)}), Verdict.ACCEPT, True, "no regression"),
    ("regression just above the margin fails",
     evidence(**healthy(target_nll__regression=paired(1.0, 0.25))),
     POLICY.model_copy(update={"target_nll": MetricRule(margin=0.2499)}), Verdict.REJECT, False, "regressed beyond"),
    # Direction: prompt gain is higher-is-better, so a fall is the regression.
    ("prompt gain falls", evidence(**healthy(prompt_gain__regression=paired(0.3, -0.1))), POLICY, Verdict.REJECT, False,
     "relies less on the meeting notes"),
    ("prompt gain rises a lot", evidence(**healthy(prompt_gain__regression=paired(0.3, 0.5))), POLICY, Verdict.ACCEPT, True,
     "no regression"),
    # The poison mechanism: the batch's own eval rows improve, the trusted rows regress.
    ("poison: new rows improve, trusted rows regress",
     evidence(**healthy(target_nll__regression=paired(1.5, 0.06), target_nll__new=paired(4.0, -2.0))),
     POLICY, Verdict.REJECT, False, "regressed beyond"),
    ("new rows alone never decide",
     evidence(target_nll__new=paired(4.0, -2.0), prompt_gain__new=paired(0.1, 0.3)), POLICY, Verdict.INCONCLUSIVE, False,
     "nothing to judge on"),
    ("too few trusted rows", evidence(target_nll__regression=paired(1.5, -0.1, n=5), prompt_gain__regression=paired(0.3, 0.0, n=5)),
     POLICY, Verdict.INCONCLUSIVE, False, "nothing to judge on"),
    ("first version judged on all rows against the base",
     evidence(first_version=True, target_nll__all=paired(3.0, -1.0), prompt_gain__all=paired(0.05, 0.1)), POLICY,
     Verdict.ACCEPT, True, "no regression"),
    ("first version: regression slice is not what it is judged on",
     evidence(first_version=True, target_nll__regression=paired(3.0, -1.0), prompt_gain__regression=paired(0.05, 0.1)),
     POLICY, Verdict.INCONCLUSIVE, False, "nothing to judge on"),
    ("first version: inconclusive promotes by default",
     evidence(first_version=True, target_nll__all=paired(3.0, -1.0), prompt_gain__all=paired(0.15, 0.03, noise=0.4)),
     POLICY, Verdict.INCONCLUSIVE, True, "inconclusive"),
    ("first version: inconclusive keeps the base when the policy says so",
     evidence(first_version=True, target_nll__all=paired(3.0, -1.0), prompt_gain__all=paired(0.15, 0.03, noise=0.4)),
     POLICY.model_copy(update={"first_version_on_inconclusive": "keep_parent"}), Verdict.INCONCLUSIVE, False, "inconclusive"),
    ("first version: a failed rule still rejects",
     evidence(first_version=True, target_nll__all=paired(3.0, 0.5), prompt_gain__all=paired(0.15, 0.0)),
     POLICY, Verdict.REJECT, False, "regressed beyond"),
    ("golden slice regresses", evidence(**healthy(target_nll__golden=paired(1.2, 0.2))), POLICY, Verdict.REJECT, False,
     "on golden rows"),
    ("relative margin widens the allowance",
     evidence(**healthy(target_nll__regression=paired(2.0, 0.125))),
     POLICY.model_copy(update={"target_nll": MetricRule(margin=0.02, relative_margin=0.1)}), Verdict.ACCEPT, True, "no regression"),
    ("relative margin of a zero baseline falls back to the absolute one",
     evidence(**healthy(rejected_nll__regression=paired(0.0, -0.125))),
     POLICY.model_copy(update={"rejected_nll": MetricRule(margin=0.0, relative_margin=0.5)}), Verdict.REJECT, False,
     "NLL of rejected outputs"),
    ("an ungated metric only reports", evidence(**healthy(artifact_validity__regression=paired(1.0, -1.0))), POLICY,
     Verdict.ACCEPT, True, "no regression"),
    ("non-finite candidate score", evidence(**healthy(target_nll__regression=paired(np.array([1.0] * 9 + [np.nan]), -0.1))),
     POLICY, Verdict.REJECT, False, "not all finite"),
    ("must-improve rule on the batch's rows",
     evidence(**healthy(target_nll__new=paired(2.0, 0.0, noise=0.01))),
     POLICY.model_copy(update={"new_rows_must_improve": True}), Verdict.INCONCLUSIVE, False, "must improve"),
    ("evaluation crashed", GateEvidence("abc", False, {}, error="CUDA out of memory"), POLICY, Verdict.REJECT, False,
     "out of memory"),
    ("no evidence", None, POLICY, Verdict.REJECT, False, "did not run"),
]


@pytest.mark.parametrize("ev,policy,verdict,promote,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(ev, policy, verdict, promote, phrase):
    decision = decide(ev, policy)
    assert decision.verdict is verdict, decision.reasons
    assert decision.promote is promote
    assert decision.accepted is promote
    assert phrase in decision.reasons[0], decision.reasons


def test_count_mismatch_between_candidate_and_parent_is_not_comparable():
    """Same slice, one score missing for the candidate: paired statistics need the same rows."""
    broken = PairedScores(tuple(f"r{i}" for i in range(10)), np.ones(9), np.ones(10), np.ones(10))
    decision = decide(evidence(**healthy(target_nll__regression=broken)), POLICY)
    assert decision.verdict is Verdict.REJECT
    assert "not comparable" in decision.reasons[0]


def test_only_a_failed_rule_blames_the_batch_not_sure_yet_is_not_no():
    poison = decide(evidence(**healthy(target_nll__regression=paired(1.5, 0.1))), POLICY)
    noisy = evidence(**healthy(target_nll__regression=paired(1.5, 0.02, noise=0.3)))
    crashed = decide(GateEvidence("abc", False, {}, error="boom"), POLICY)
    too_few = decide(evidence(target_nll__regression=paired(1.5, 0.5, n=3), prompt_gain__regression=paired(0.3, 0, n=3)), POLICY)
    promoted_anyway = decide(noisy, POLICY.model_copy(update={"on_inconclusive": "promote"}))
    assert poison.verdict is Verdict.REJECT and poison.blames_batch and not poison.undecided
    # An interval that straddles the margin keeps the parent, but its batch waits for more evidence.
    assert decide(noisy, POLICY).verdict is Verdict.INCONCLUSIVE
    assert not decide(noisy, POLICY).blames_batch and decide(noisy, POLICY).undecided
    assert too_few.undecided and not too_few.blames_batch
    assert not crashed.blames_batch and not crashed.undecided  # a crash is no evidence about the rows either way
    assert not promoted_anyway.blames_batch and not promoted_anyway.undecided


def test_every_verdict_records_interval_n_and_margin():
    decision = decide(evidence(**healthy(target_nll__new=paired(4.0, -1.0))), POLICY)
    judged = [c for c in decision.checks if c.metric == "target_nll" and c.slice == "regression"][0]
    assert judged.n == 20 and judged.margin == pytest.approx(POLICY.target_nll.margin)
    assert judged.low <= judged.delta <= judged.high
    assert judged.outcome is Outcome.PASS
    reported = [c for c in decision.checks if c.slice == "new"][0]
    assert reported.outcome is Outcome.REPORTED and not reported.gated
    assert "arrived with the batch" in reported.reason
    record = judged.as_record()
    assert {"metric", "slice", "n", "parent", "candidate", "delta", "low", "high", "margin", "outcome", "reason"} <= set(record)


def test_the_bootstrap_is_seeded_from_the_snapshot():
    noisy = healthy(target_nll__regression=paired(1.5, -0.05, noise=0.3))
    first, again = decide(evidence(**noisy), POLICY), decide(evidence(**noisy), POLICY)
    other = decide(evidence(snapshot="another", **noisy), POLICY)
    assert [c.as_record() for c in first.checks] == [c.as_record() for c in again.checks]
    assert first.checks[0].low != other.checks[0].low


def test_token_weights_count():
    """A long example that regressed outweighs short ones that improved (per-token metrics)."""
    parent = np.full(10, 1.0)
    delta = np.array([0.5] + [-0.01] * 9)
    weights = np.array([1000.0] + [1.0] * 9)
    scores = PairedScores(tuple(f"r{i}" for i in range(10)), parent + delta, parent, weights)
    check = decide(evidence(**healthy(target_nll__regression=scores)), POLICY).checks[0]
    assert check.delta == pytest.approx((500 - 0.09) / 1009)
