"""Held, released, excluded and trusted rows and the parent-score cache, on real DuckDB files."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from incremental.errors import InvalidFeedbackError
from incremental.feedback import FeedbackStore

from conftest import ids_in

V1 = "v1_20250101_000000"
V2 = "v2_20250102_000000"


def row(row_id: str, **overrides) -> dict:
    return {
        "id": row_id, "model": "tiny", "artifact_type": "erd", "prompt": f"notes of {row_id}",
        "output": f"erDiagram\n  A{row_id.replace('-', '')} {{\n    string name\n  }}", "rating": "good", **overrides,
    }  # fmt: skip


def ids(table) -> set[str]:
    return set(table.column("id").to_pylist())


def test_hold_release_exclude_include(store: FeedbackStore) -> None:
    train = ids_in("train", 4, "t")
    store.add_many([row(i) for i in train])
    assert store.mark("tiny", train[:2], "hold", reason="batch of rejected v3", actor="gate", version=V2) == 2
    collected = store.collect("tiny", [])
    assert ids(collected.new) == set(train[2:]) and ids(collected.held) == set(train[:2])
    assert set(collected.held.column("hold_reason").to_pylist()) == {"batch of rejected v3"}
    assert store.held_by("tiny", V2) == tuple(sorted(train[:2]))
    # Holding again changes nothing and records nothing.
    assert store.mark("tiny", train[:2], "hold", reason="again", actor="gate") == 0

    assert store.mark("tiny", [train[0]], "release", reason="looked fine", actor="ana") == 1
    assert ids(store.collect("tiny", []).new) == {train[0], *train[2:]}
    assert store.held_by("tiny", V2) == (train[1],)

    # Exclusion wins over a release, hides the row everywhere, and is reversible.
    store.mark("tiny", [train[1]], "exclude", reason="spam", actor="ana")
    store.mark("tiny", [train[1]], "release", reason="oops", actor="ana")
    collected = store.collect("tiny", [])
    assert train[1] not in ids(collected.new) | ids(collected.held) | ids(collected.learned)
    assert collected.n_excluded == 1 and store.counts("tiny", []).excluded == 1
    store.mark("tiny", [train[1]], "include", reason="not spam after all", actor="ana")
    assert train[1] in ids(store.collect("tiny", []).new)

    # Nothing is deleted: every mark is on record, in order, with who and why.
    history = [(m.feedback_id, m.action, m.actor) for m in store.marks("tiny", [train[1]])]
    assert history == [(train[1], "hold", "gate"), (train[1], "exclude", "ana"), (train[1], "release", "ana"),
                       (train[1], "include", "ana")]  # fmt: skip
    with duckdb.connect(str(store.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM feedback").fetchall() == [(4,)]


def test_marks_refuse_unknown_ids_and_missing_reasons_recording_nothing(store: FeedbackStore) -> None:
    train = ids_in("train", 1, "u")
    store.add_many([row(i) for i in train])
    with pytest.raises(InvalidFeedbackError, match=r"not feedback rows of model 'tiny': 'nope'"):
        store.mark("tiny", [train[0], "nope"], "hold", reason="x", actor="y")
    with pytest.raises(ValueError, match="needs a reason"):
        store.mark("tiny", train, "exclude", reason=" ", actor="y")
    with pytest.raises(ValueError, match="not a mark"):
        store.mark("tiny", train, "delete", reason="x", actor="y")
    assert store.marks("tiny") == ()


def test_trusted_eval_rows_arrived_before_the_parent_was_accepted(store: FeedbackStore) -> None:
    early, late = ids_in("eval", 2, "e")
    uncorrected = ids_in("train", 1, "r")[0]
    store.add_many([row(early), row(uncorrected, rating="needs_improvement")])
    time.sleep(0.01)
    accepted_at = datetime.now(UTC)
    time.sleep(0.01)
    store.add_many([row(late)])
    collected = store.collect("tiny", [V1], trusted_before=accepted_at)
    trusted = dict(zip(collected.eval.column("id").to_pylist(), collected.eval.column("trusted").to_pylist()))
    assert trusted == {early: True, late: False}
    assert collected.rejected.column("trusted").to_pylist() == [True]
    assert store.counts("tiny", [V1], trusted_before=accepted_at).trusted_eval == 1
    # Base mode trusts nothing; a held row is neither eval nor trusted.
    assert not any(store.collect("tiny", []).eval.column("trusted").to_pylist())
    store.mark("tiny", [early], "hold", reason="screened", actor="screening")
    assert ids(store.collect("tiny", [V1], trusted_before=accepted_at).eval) == {late}
    with pytest.raises(ValueError, match="timezone-aware"):
        store.collect("tiny", [V1], trusted_before=datetime(2025, 1, 1))


def test_a_row_that_arrived_at_the_acceptance_instant_is_trusted(store: FeedbackStore) -> None:
    """The cutoff is inclusive: arrived at or before the parent was accepted."""
    (row_id,) = ids_in("eval", 1, "b")
    store.add_many([row(row_id)])
    arrived = store.collect("tiny", []).eval.column("ingested_at")[0].as_py()
    at = store.collect("tiny", [V1], trusted_before=arrived).eval.column("trusted").to_pylist()
    before = store.collect("tiny", [V1], trusted_before=arrived - timedelta(microseconds=1)).eval.column("trusted").to_pylist()
    assert (at, before) == ([True], [False])


def test_score_cache_round_trip_keeps_the_first_entry(store: FeedbackStore) -> None:
    store.cache_scores("tiny", V1, "nll-abc", {"h1": (1.5, 10, None), "h2": (2.0, 4, None)})
    store.cache_scores("tiny", V1, "nll-abc", {"h1": (9.9, 99, None)})
    store.cache_scores("tiny", V1, "greedy-abc", {"h1": (None, None, "erDiagram")})
    assert store.cached_scores("tiny", V1, "nll-abc", ["h1", "h2", "h3"]) == {"h1": (1.5, 10, None), "h2": (2.0, 4, None)}
    assert store.cached_scores("tiny", V1, "greedy-abc", ["h1"]) == {"h1": (None, None, "erDiagram")}
    assert store.cached_scores("tiny", V2, "nll-abc", ["h1"]) == {}
    with pytest.raises(ValueError, match="finished versions"):
        store.cache_scores("tiny", "base", "nll-abc", {"h1": (1.0, 1, None)})
