"""The gate as a table of cases: paired per-example scores of candidate and parent, the expected verdict."""

import numpy as np
import pytest

from incremental.config import GatePolicy, MetricRule
from incremental.gate import GateEvidence, Outcome, PairedScores, Verdict, decide

POLICY = GatePolicy(min_eval_examples=8, bootstrap_resamples=1000)
RNG = np.random.default_rng(0)
NOISE = RNG.normal(0.0, 1.0, size=200)


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
    ("an ungated metric only reports", evidence(**healthy(rejected_nll__regression=paired(1.0, -1.0))), POLICY,
     Verdict.ACCEPT, True, "no regression"),
    ("validity is gated: all valid to none fails", evidence(**healthy(artifact_validity__regression=paired(1.0, -1.0))), POLICY,
     Verdict.REJECT, False, "artifact validity on regression rows"),
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


# ---- per-type guardrails ---------------------------------------------------------------------------


def typed(per_type: dict[str, tuple[float, float, float]], n: int = 20) -> PairedScores:
    """Paired scores over several artifact types: {type: (parent, delta, noise)}, n rows each."""
    ids, cand, par, types = [], [], [], []
    for name, (parent_value, delta, noise) in per_type.items():
        values = np.full(n, parent_value)
        ids += [f"{name}-{i}" for i in range(n)]
        par += list(values)
        cand += list(values + delta + noise * NOISE[:n])
        types += [name] * n
    return PairedScores(tuple(ids), np.array(cand), np.array(par), np.ones(len(ids)), tuple(types))


def test_a_regression_on_one_type_fails_although_the_pool_improves():
    """ERD and API improve clearly, prototypes get clearly worse: the pooled NLL improves, the gate rejects."""
    nll = typed({"erd": (1.5, -0.2, 0.0), "api": (1.5, -0.2, 0.0), "prototype": (1.5, 0.15, 0.0)})
    decision = decide(evidence(target_nll__regression=nll, prompt_gain__regression=paired(0.3, 0.02, n=60)), POLICY)
    assert decision.verdict is Verdict.REJECT and decision.blames_batch
    by_where = {c.where: c for c in decision.checks if c.metric == "target_nll"}
    assert by_where["regression"].outcome is Outcome.PASS  # the pool alone would accept
    assert by_where["regression · prototype"].outcome is Outcome.FAIL
    assert by_where["regression · erd"].outcome is Outcome.PASS
    assert "of type prototype" in decision.reasons[0]
    assert by_where["regression · prototype"].as_record()["group"] == "prototype"


def test_a_type_with_too_few_rows_is_reported_with_the_rows_it_needs_and_does_not_decide():
    nll = typed({"erd": (1.5, -0.1, 0.0), "api": (1.5, -0.1, 0.0)}, n=20)
    few = typed({"prototype": (1.5, 0.5, 0.0)}, n=3)  # a large regression, but on 3 rows
    pooled = PairedScores(nll.ids + few.ids, np.r_[nll.candidate, few.candidate], np.r_[nll.parent, few.parent],
                          np.ones(43), nll.types + few.types)  # fmt: skip
    decision = decide(evidence(target_nll__regression=pooled, prompt_gain__regression=paired(0.3, 0.02, n=43)), POLICY)
    proto = next(c for c in decision.checks if c.where == "regression · prototype" and c.metric == "target_nll")
    assert proto.outcome is Outcome.TOO_FEW and not proto.gated and proto.more_rows == POLICY.min_rows_per_type - 3
    assert "5 more would let the gate judge it" in proto.reason


def test_a_lone_type_is_judged_pooled_only():
    decision = decide(evidence(target_nll__regression=typed({"erd": (1.5, -0.1, 0.0)}), prompt_gain__regression=paired(0.3, 0.02)), POLICY)
    assert [c.where for c in decision.checks if c.metric == "target_nll"] == ["regression"]


def test_failing_one_of_many_guardrails_needs_the_bonferroni_level():
    """A regression whose 90 % interval just clears the margin fails when it is the only guardrail, and is
    inconclusive among many (the chance that one of many fails by luck must stay at the policy's level)."""
    regression = paired(1.5, 0.0215, n=30, noise=0.03)  # 90 % interval just clear of the margin
    one = decide(evidence(target_nll__regression=regression), POLICY.model_copy(update={"prompt_gain": MetricRule(margin=0.03, gated=False)}))
    check = next(c for c in one.checks if c.metric == "target_nll")
    assert check.outcome is Outcome.FAIL, check.reason
    many = {f"{m}__regression": paired(0.3, 0.0, n=30) for m in ("prompt_gain", "preference_margin")}
    several = decide(evidence(target_nll__regression=regression, **many), POLICY)
    check = next(c for c in several.checks if c.metric == "target_nll")
    assert check.outcome is Outcome.INCONCLUSIVE and "not at the" in check.reason, check.reason
    assert several.undecided and not several.blames_batch


def test_an_undecided_guardrail_says_how_many_more_rows_would_decide_it():
    noisy = paired(1.5, 0.0, n=20, noise=0.1)
    decision = decide(evidence(**healthy(target_nll__regression=noisy)), POLICY)
    check = next(c for c in decision.checks if c.metric == "target_nll")
    assert check.outcome is Outcome.INCONCLUSIVE and check.more_rows is not None and check.more_rows > 0
    assert f"about {check.more_rows} more rows would decide it" in check.reason
    # With that many more rows of the same spread and the same change (the rows repeated whole), it decides.
    n = 20 * -(-(20 + check.more_rows) // 20)
    bigger = PairedScores(tuple(f"r{i}" for i in range(n)), np.resize(noisy.candidate, n), np.resize(noisy.parent, n), np.ones(n))
    again = decide(evidence(**healthy(target_nll__regression=bigger)), POLICY)
    assert next(c for c in again.checks if c.metric == "target_nll").outcome is Outcome.PASS


@pytest.mark.parametrize(
    ("n", "regression", "low", "high", "margin", "expected"),
    [
        (20, 0.0, -0.02, 0.02, 0.01, 60),  # half-width 0.02 -> 0.01: four times the rows
        (20, 0.01, 0.0, 0.02, 0.01, None),  # on the margin: no number of rows decides it
        (10, 0.0, -0.05, 0.05, 0.025, 30),  # half-width 0.05 -> 0.025
    ],
)
def test_rows_to_decide(n, regression, low, high, margin, expected):
    from incremental.gate import rows_to_decide

    assert rows_to_decide(n, regression, low, high, margin) == expected


def test_generation_metrics_are_gated_per_type_once_there_are_enough_generated_rows():
    validity = typed({"erd": (1.0, 0.0, 0.0), "api": (1.0, 0.0, 0.0), "prototype": (1.0, -0.5, 0.0)}, n=30)
    decision = decide(evidence(**healthy(artifact_validity__regression=validity)), POLICY)
    assert decision.verdict is Verdict.REJECT
    failed = [c.where for c in decision.checks if c.outcome is Outcome.FAIL]
    assert failed == ["regression", "regression · prototype"]
    few = typed({"erd": (1.0, 0.0, 0.0), "prototype": (1.0, -0.5, 0.0)}, n=3)  # under min_generation_rows, pooled too
    decision = decide(evidence(**healthy(artifact_validity__regression=few)), POLICY)
    assert decision.verdict is Verdict.ACCEPT
    assert all(c.outcome is Outcome.TOO_FEW for c in decision.checks if c.metric == "artifact_validity")


def test_a_type_that_cannot_be_told_apart_does_not_block_unless_the_policy_asks_it_to():
    """Per-type checks are deterioration tests by default: a straddling interval on one type reports how
    many rows it needs and lets the pooled guardrails decide; `per_type_test='non_inferiority'` blocks."""
    nll = typed({"erd": (1.5, -0.05, 0.0), "api": (1.5, -0.05, 0.0), "prototype": (1.5, 0.01, 0.08)}, n=12)
    scores = evidence(target_nll__regression=nll, prompt_gain__regression=paired(0.3, 0.02, n=36))
    lenient = decide(scores, POLICY)
    proto = next(c for c in lenient.checks if c.where == "regression · prototype" and c.metric == "target_nll")
    assert proto.outcome is Outcome.NOT_SHOWN_WORSE and proto.passed and "deterioration test" in proto.reason
    assert lenient.verdict is Verdict.ACCEPT
    strict = decide(scores, POLICY.model_copy(update={"per_type_test": "non_inferiority"}))
    assert strict.verdict is Verdict.INCONCLUSIVE and strict.undecided
    assert next(c for c in strict.checks if c.where == "regression · prototype" and c.metric == "target_nll").outcome is Outcome.INCONCLUSIVE


def test_validity_is_a_deterioration_test_a_clear_fall_fails_a_straddle_does_not():
    n = 30
    # Both 0.7 valid, but on different rows (18 of 30 discordant): the interval is far wider than the margin.
    straddle = PairedScores(tuple(f"r{i}" for i in range(n)), np.r_[np.ones(21), np.zeros(9)], np.r_[np.zeros(9), np.ones(21)], np.ones(n))
    decision = decide(evidence(**healthy(artifact_validity__regression=straddle)), POLICY)
    check = next(c for c in decision.checks if c.metric == "artifact_validity")
    assert check.outcome is Outcome.NOT_SHOWN_WORSE and decision.verdict is Verdict.ACCEPT, check.reason
    fall = PairedScores(tuple(f"r{i}" for i in range(n)), np.r_[np.ones(10), np.zeros(20)], np.ones(n), np.ones(n))
    assert decide(evidence(**healthy(artifact_validity__regression=fall)), POLICY).verdict is Verdict.REJECT
