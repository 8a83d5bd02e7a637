"""Screening rules as tables: one row's reasons from the parent's scores and its own text, grounding,
and acceptance sampling per lot (one rater's rows from one source)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from incremental.config import ScreeningPolicy
from incremental.screening import (
    FORMAT,
    INCOMPLETE,
    LOT,
    NO_PROMPT_GAIN,
    NOVEL_FROM_FLAGGED_RATER,
    NOVEL_UNGROUNDED,
    UNGROUNDED,
    RaterStanding,
    ScreenedRow,
    covered_share,
    grounded_share,
    hold_bad_lots,
    name_vocabulary,
    rule_of,
    standing,
    suspect_reason,
)
from incremental.statistics import binomial_tail
from incremental.synthetic import generate_cases, poisoned_feedback, restyle_artifact, synthetic_feedback

POLICY = ScreeningPolicy(min_prompt_gain=0.0, max_nll_z=4.0, min_reference_rows=6)
CASE = next(case for case in generate_cases(20, 3) if case.artifact_type == "erd")
ERD, NOTES = CASE.artifact, CASE.notes
# Reference: median NLL 0.2 with a robust SD of 1.4826 * 0.05; median gain 0.15.
REF_NLL = np.array([0.15, 0.15, 0.2, 0.2, 0.2, 0.25, 0.25])
REF_GAIN = np.array([0.1, 0.12, 0.15, 0.15, 0.15, 0.2, 0.3])
SD = 1.4826 * 0.05
# The same ERD with one invented field: 1 of its names is not in the notes.
ONE_INVENTED = ERD.replace("\n  }", "\n    string wingspan\n  }", 1)
# Every field replaced by words the notes never use.
INVENTED = "erDiagram\n  Zeppelin {\n    string wingspan\n    int altitude\n  }"
FLAGGED = RaterStanding("mallory", bad=8, settled=10, flagged=True)

CASES = [
    # id, notes, target, nll, gain, reference gains, rater, expected rule (None: not suspect)
    ("clean row", NOTES, ERD, 0.2, 0.15, REF_GAIN, None, None),
    ("gain exactly at the threshold is suspect", NOTES, ERD, 0.2, 0.0, REF_GAIN, None, NO_PROMPT_GAIN),
    ("gain just above the threshold is fine", NOTES, ERD, 0.2, 1e-6, REF_GAIN, None, None),
    # A model cannot copy names it never saw: a novel row's missing gain is no evidence against it.
    ("novel row without prompt gain: not held", NOTES, ERD, 0.2 + 40 * SD, -0.2, REF_GAIN, None, None),
    ("parent that does not read notes: gain rule off", NOTES, ERD, 0.2, -0.5, np.array([0.0, -0.1, 0.0, 0.05, -0.02, 0.0]), None, None),
    # Its median reads notes, but the rule would flag 2 of its 7 clean trusted rows (more than clean_suspect_share).
    ("parent that reads notes weakly: gain rule off", NOTES, ERD, 0.2, -0.5, np.array([-0.05, 0.0, 0.02, 0.05, 0.1, 0.12, 0.2]), None, None),
    ("parent that reads notes on every trusted row: gain rule on", NOTES, ERD, 0.2, -0.5, np.array([0.01, 0.02, 0.02, 0.05, 0.1, 0.12, 0.2]), None, NO_PROMPT_GAIN),
    # The boundary: with 20 trusted rows, 1 at or under the threshold is 5 % (rule on), 2 are 10 % (off); a gain of
    # exactly the threshold counts as not reading the notes.
    ("1 of 20 trusted rows without gain: gain rule on", NOTES, ERD, 0.2, -0.5, np.array([0.0] + [0.1] * 19), None, NO_PROMPT_GAIN),
    ("2 of 20 trusted rows without gain: gain rule off", NOTES, ERD, 0.2, -0.5, np.array([0.0, 0.0] + [0.1] * 18), None, None),
    ("too few reference rows: gain rule off", NOTES, ERD, 0.2, -0.5, REF_GAIN[:5], None, None),
    # Novelty alone never holds: a correction is by definition what the parent does not do yet.
    ("novel but grounded: not held", NOTES, ERD, 0.2 + 40 * SD, 0.15, REF_GAIN, None, None),
    ("novel, one invented field: held", NOTES, ONE_INVENTED, 0.2 + 4.01 * SD, 0.15, REF_GAIN, None, NOVEL_UNGROUNDED),
    ("familiar, one invented field: fine", NOTES, ONE_INVENTED, 0.2 + 3.99 * SD, 0.15, REF_GAIN, None, None),
    ("novel, from a flagged rater: waits", NOTES, ERD, 0.2 + 4.01 * SD, 0.15, REF_GAIN, FLAGGED, NOVEL_FROM_FLAGGED_RATER),
    ("familiar, from a flagged rater: fine", NOTES, ERD, 0.2, 0.15, REF_GAIN, FLAGGED, None),
    ("names its notes never mention", NOTES, INVENTED, 0.2, 0.15, REF_GAIN, None, UNGROUNDED),
    ("not an ERD", NOTES, "openapi: 3.0.0\npaths: {}", 0.2, 0.15, REF_GAIN, None, FORMAT),
]


@pytest.mark.parametrize("notes,target,nll,gain,ref_gain,rater,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_suspect_reason(notes, target, nll, gain, ref_gain, rater, rule):
    reason = suspect_reason("erd", notes, target, nll, gain, REF_NLL, ref_gain, POLICY, rater)
    if rule is None:
        assert reason is None
    else:
        assert reason is not None and rule_of(reason) == rule, reason


def test_a_target_that_leaves_out_most_names_its_notes_mention_is_incomplete():
    notes = "Members borrow many books.\nBooks have title, isbn and year.\nMembers have name and email."
    whole = "erDiagram\n  Member ||--o{ Book : borrows\n  Member {\n    string name\n    string email\n  }\n  Book {\n    string title\n    string isbn\n    int year\n  }"
    first_only = "erDiagram\n  Member {\n    string name\n    string email\n  }"
    vocabulary = name_vocabulary([("erd", whole)])
    assert covered_share("erd", whole, notes, vocabulary) == 1.0
    assert covered_share("erd", first_only, notes, vocabulary) == pytest.approx(3 / 7)
    reason = suspect_reason("erd", notes, first_only, 0.2, 0.15, REF_NLL, REF_GAIN, POLICY, None, vocabulary)
    assert reason is not None and rule_of(reason) == INCOMPLETE
    # Names no artifact uses are not counted; too few known names and coverage is not judged.
    assert covered_share("erd", first_only, "Members have an email and a phone.", vocabulary) is None
    assert covered_share("erd", first_only, notes, frozenset()) is None


def test_format_rule_can_be_switched_off():
    off = POLICY.model_copy(update={"check_format": False})
    assert suspect_reason("erd", NOTES, "not an erd", 0.2, 0.15, REF_NLL, REF_GAIN, off) is None


@pytest.mark.parametrize(
    "text,notes,share",
    [
        ("erDiagram\n  Book {\n    string title\n  }", "Books have a title.", 1.0),
        ("erDiagram\n  Category {\n    string name\n  }", "We file categories by name.", 1.0),  # plural endings
        ("erDiagram\n  OrderLine {\n    int unitPrice\n  }", "Each order line has a unit price.", 1.0),  # camelCase
        ("erDiagram\n  Book {\n    int id\n    string title\n  }", "Books have a title.", 1.0),  # conventional key
        ("erDiagram\n  Book {\n    string title\n    string colour\n  }", "Books have a title.", 2 / 3),
        ("erDiagram\n  Zeppelin {\n    int altitude\n  }", "Books have a title.", 0.0),
        ("not an erd", "Books have a title.", None),
    ],
)
def test_grounded_share(text, notes, share):
    assert grounded_share("erd", text, notes) == (None if share is None else pytest.approx(share))


def test_every_honest_artifact_is_fully_grounded_and_restyling_keeps_it_so():
    for row in synthetic_feedback(60, 11, model="m") + synthetic_feedback(60, 12, model="m", new_domain=True):
        target = row["correction"] or row["output"]
        if row["rating"] == "good" or row["correction"]:
            assert grounded_share(row["artifact_type"], target, row["prompt"]) == 1.0
            restyled = restyle_artifact(row["artifact_type"], target, 3)
            assert grounded_share(row["artifact_type"], restyled, row["prompt"]) == 1.0


def test_most_invented_fields_are_below_the_default_share():
    # Replaced fields sometimes land on words the notes use for another entity: the lot rule holds the rest.
    rows = [r for seed in range(5) for r in poisoned_feedback(40, seed, "wrong_fields", model="m")]
    shares = [grounded_share(r["artifact_type"], r["output"], r["prompt"]) for r in rows]
    assert sum(share < ScreeningPolicy().min_grounded_share for share in shares) >= 0.95 * len(rows)


def rows(source: str, n: int, flagged: int, rater: str | None = None) -> list[ScreenedRow]:
    return [
        ScreenedRow(f"{source}-{rater}-{i}", "erd", source, rater, 0.2, 0.1, 0.0, 1.0, "own: reason" if i < flagged else None)
        for i in range(n)
    ]


def threshold(n: int, policy: ScreeningPolicy) -> int:
    """The smallest number of suspects in n rows that holds the lot."""
    return next(k for k in range(n + 1) if binomial_tail(k, n, policy.clean_suspect_share) < policy.lot_p_value)


def test_a_lot_with_improbably_many_suspects_is_held_whole_per_source():
    k = threshold(60, POLICY)
    assert 5 < k < 15  # 60 rows at 5 %: about 3 expected
    out = {row.id: row.reason for row in hold_bad_lots(rows("import", 60, k) + rows("ui", 60, k - 1), POLICY)}
    assert all(out[f"import-None-{i}"] for i in range(60))
    assert out["import-None-0"] == "own: reason" and rule_of(out["import-None-59"]) == LOT
    assert "source 'import'" in out["import-None-59"]
    assert sum(1 for i in range(60) if out[f"ui-None-{i}"]) == k - 1  # one fewer: only its own suspects


def test_one_raters_bad_lot_never_holds_another_raters_rows_from_the_same_source():
    k = threshold(20, POLICY)
    out = {row.id: row.reason for row in hold_bad_lots(rows("rate", 20, k, "dee") + rows("rate", 40, 1, "ana"), POLICY)}
    assert all(out[f"rate-dee-{i}"] for i in range(20)) and "rater 'dee'" in out["rate-dee-19"]
    assert [i for i in range(40) if out[f"rate-ana-{i}"]] == [0]  # only ana's own suspect


def test_a_flagged_raters_novel_rows_wait_without_holding_the_rest_of_their_lot():
    # Measured on the demo's end state: a clean batch of 54 rows from a flagged rater had 8 rows new to
    # the parent; counted as suspects they held all 54. Novel rows wait; the lot is judged on wrongness.
    k = threshold(54, POLICY)
    waiting = [
        replace(row, reason=f"{NOVEL_FROM_FLAGGED_RATER}: its NLL is 5.0 robust SDs above the parent's") if i < k else row
        for i, row in enumerate(rows("synthetic", 54, 0))
    ]
    out = {row.id: row.reason for row in hold_bad_lots(waiting, POLICY)}
    assert [i for i in range(54) if out[f"synthetic-None-{i}"]] == list(range(k))
    assert all(rule_of(out[f"synthetic-None-{i}"]) == NOVEL_FROM_FLAGGED_RATER for i in range(k))
    # Rows flagged for what makes them wrong still count, beside the waiting ones.
    wrong = [replace(row, reason="format: its target does not parse") if i >= 54 - k else row for i, row in enumerate(waiting)]
    out = {row.id: row.reason for row in hold_bad_lots(wrong, POLICY)}
    assert all(out.values()) and rule_of(out[f"synthetic-None-{k}"]) == LOT
    assert f"{k} of 54 rows are suspect" in out[f"synthetic-None-{k}"]


def test_binomial_tail():
    assert binomial_tail(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_tail(10, 10, 0.3) == pytest.approx(0.3**10)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)
    exact = sum(math.comb(60, i) * 0.05**i * 0.95 ** (60 - i) for i in range(9, 61))
    assert binomial_tail(9, 60, 0.05) == pytest.approx(exact)
    with pytest.raises(ValueError):
        binomial_tail(3, 2, 0.5)


@pytest.mark.parametrize(
    "excluded,blamed,released,flagged",
    [
        (0, 0, 0, False),  # a new rater: neither trusted nor punished
        (5, 0, 0, True),  # a person excluded five of their rows
        (4, 0, 0, False),  # too few to judge by
        (0, 30, 30, False),  # the gate held their batch, a person released it: fine
        (0, 10, 2, True),
        (5, 0, 40, False),  # 5 bad of 45 settled: under a fifth
    ],
)
def test_a_raters_record_flags_them_only_on_settled_bad_rows(excluded, blamed, released, flagged):
    from incremental.feedback.raters import RaterRecord

    record = RaterRecord(rater="r", rows=100, held=0, released=released, excluded=excluded, blamed_by_gate=blamed)
    assert standing(record, ScreeningPolicy()).flagged is flagged
