"""The gate as a table of cases: each row is candidate vs parent and the expected verdict."""

import math

import pytest

from incremental.config import GatePolicy
from incremental.gate import EvalScores, Verdict, decide

POLICY = GatePolicy(max_nll_increase=0.02, max_prompt_gain_drop=0.05, min_eval_examples=4)


def scores(nll=1.5, gain=0.3, n=10, snapshot="abc", error=None, **extra):
    metrics = {"target_nll": nll, "prompt_gain": gain, **extra}
    return EvalScores(snapshot_hash=snapshot, n_examples=n, metrics=metrics, error=error)


CASES = [
    # id, candidate, parent, verdict, a word the first reason must contain
    ("better on both", scores(1.40, 0.32), scores(1.50, 0.30), Verdict.ACCEPT, "same snapshot"),
    ("equal is not a regression", scores(1.50, 0.30), scores(1.50, 0.30), Verdict.ACCEPT, "same snapshot"),
    ("nll worse within margin", scores(1.515, 0.30), scores(1.50, 0.30), Verdict.ACCEPT, "same snapshot"),
    ("nll worse beyond margin", scores(1.53, 0.30), scores(1.50, 0.30), Verdict.REJECT, "rose by 0.0300"),
    ("gain drop within margin", scores(1.40, 0.26), scores(1.50, 0.30), Verdict.ACCEPT, "same snapshot"),
    # The poisoned batch of the issue: NLL improves while prompt gain collapses.
    ("poison: nll better, gain collapses", scores(1.47, 0.019), scores(1.58, 0.285), Verdict.REJECT, "meeting notes"),
    ("nan candidate metric", scores(math.nan, 0.3), scores(1.5, 0.3), Verdict.REJECT, "not a finite"),
    ("inf parent metric", scores(1.4, 0.3), scores(math.inf, 0.3), Verdict.REJECT, "not a finite"),
    ("missing metric", scores(None, 0.3), scores(1.5, 0.3), Verdict.REJECT, "missing for the candidate"),
    ("empty eval set", scores(1.4, 0.3, n=0), scores(1.5, 0.3, n=0), Verdict.REJECT, "held-out examples"),
    ("too few eval examples", scores(1.4, 0.3, n=3), scores(1.5, 0.3, n=3), Verdict.REJECT, "at least 4"),
    ("different snapshots", scores(1.4, 0.3, snapshot="x"), scores(1.5, 0.3, snapshot="y"), Verdict.REJECT, "different eval"),
    ("candidate eval crashed", scores(error="CUDA out of memory"), scores(), Verdict.REJECT, "out of memory"),
    ("parent eval crashed", scores(), scores(error="boom"), Verdict.REJECT, "parent evaluation failed"),
    ("no candidate scores", None, scores(), Verdict.REJECT, "did not run"),
    ("no parent scores", scores(), None, Verdict.REJECT, "did not run"),
]


@pytest.mark.parametrize("candidate,parent,verdict,word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide_table(candidate, parent, verdict, word):
    decision = decide(candidate, parent, POLICY)
    assert decision.verdict is verdict
    assert word in decision.reasons[0]
    assert decision.accepted is (verdict is Verdict.ACCEPT)


def test_every_gated_metric_is_reported():
    decision = decide(scores(), scores(), POLICY)
    assert [c.name for c in decision.checks] == ["eval_set", "target_nll", "prompt_gain"]


def test_extra_metrics_do_not_change_the_verdict():
    # Informational metrics (e.g. NLL on rejected outputs) are recorded, not gated.
    decision = decide(scores(rejected_nll=math.nan), scores(rejected_nll=1.0), POLICY)
    assert decision.verdict is Verdict.ACCEPT
