"""The learned record, the bounded eval window, rows by id and the v1 -> current migration, on real DuckDB files."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from incremental.config import DataSettings
from incremental.dataset import content_hash, plan_dataset, rebuild_plan
from incremental.feedback import SCHEMA_VERSION, EvalWindow, FeedbackSchemaError, FeedbackStore

from conftest import ids_in

V1, V2, V3 = "v1_20250101_000000", "v2_20250102_000000", "v3_20250103_000000"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
START = datetime(2025, 3, 1, tzinfo=UTC)


def row(row_id: str, *, minute: int = 0, artifact_type: str = "erd", **overrides) -> dict:
    return {
        "id": row_id, "model": "tiny", "artifact_type": artifact_type, "prompt": f"notes of {row_id}",
        "output": f"output of {row_id}", "rating": "good", "created_at": START + timedelta(minutes=minute), **overrides,
    }  # fmt: skip


def ids(table) -> list[str]:
    return table.column("id").to_pylist()


def learned_record(store: FeedbackStore) -> set[str]:
    with duckdb.connect(str(store.path), read_only=True) as con:
        return {r[0] for r in con.execute("SELECT feedback_id FROM learned_rows WHERE model = 'tiny'").fetchall()}


def test_promotion_advances_the_learned_record_and_rollback_rebuilds_it(store: FeedbackStore) -> None:
    first, second, third = ids_in("train", 3, "t")
    store.add_many([row(first), row(second, minute=1), row(third, minute=2)])
    store.record_consumption("tiny", V1, new_ids=[first], replay_ids=[])
    assert store.sync_learned("tiny", [V1]) == "rebuilt"  # a first use builds it
    assert store.sync_learned("tiny", [V1]) == "current"

    # V2 is promoted on V1: only V2's rows are added.
    store.record_consumption("tiny", V2, new_ids=[second], replay_ids=[first])
    assert store.sync_learned("tiny", [V2, V1]) == "advanced"
    assert learned_record(store) == {first, second}
    assert ids(store.collect("tiny", [V2, V1]).new) == [third]

    # A rejected V3 on V2 trained on `third`: not in the lineage, so `third` stays new.
    store.record_consumption("tiny", V3, new_ids=[third], replay_ids=[second])
    assert ids(store.collect("tiny", [V2, V1]).new) == [third]

    # Rollback to V1: rows learned only by the abandoned V2 are new again.
    rolled_back = store.collect("tiny", [V1])
    assert ids(rolled_back.new) == [second, third] and ids(rolled_back.learned) == [first]
    assert learned_record(store) == {first}
    # Base mode: nothing learned.
    assert ids(store.collect("tiny", []).new) == [first, second, third]
    assert learned_record(store) == set()


def test_collect_returns_the_replay_pool_as_ids_and_text_only_for_rows_it_uses(store: FeedbackStore) -> None:
    train = ids_in("train", 6, "t")
    store.add_many([row(i, minute=n) for n, i in enumerate(train)])
    store.record_consumption("tiny", V1, new_ids=train[:4], replay_ids=[])
    collected = store.collect("tiny", [V1])
    assert collected.learned.column_names == ["id", "created_at"]
    assert ids(collected.learned) == train[:4]
    assert ids(collected.new) == train[4:] and collected.new.column("prompt").to_pylist() == [f"notes of {i}" for i in train[4:]]
    # rows() fetches text in the order asked, and names ids it does not know.
    fetched = store.rows("tiny", [train[2], train[0]])
    assert ids(fetched) == [train[2], train[0]] and fetched.column("target").to_pylist() == [f"output of {train[2]}", f"output of {train[0]}"]
    with pytest.raises(ValueError, match="not feedback rows of model 'tiny'"):
        store.rows("tiny", [train[0], "nope"])


def test_the_eval_window_keeps_recent_trusted_rows_per_type_anchors_and_every_untrusted_row(store: FeedbackStore) -> None:
    evals = ids_in("eval", 40, "e")
    types = ("erd", "api", "prototype")
    store.add_many([row(i, minute=n, artifact_type=types[n % 3]) for n, i in enumerate(evals[:30])])
    accepted = datetime.now(UTC)  # the 30 rows above arrived before the parent was accepted: trusted
    store.add_many([row(i, minute=100 + n, artifact_type=types[n % 3]) for n, i in enumerate(evals[30:])])

    everything = store.collect("tiny", [], trusted_before=accepted)
    assert everything.eval.num_rows == 40

    window = EvalWindow(per_type=3, anchors=2)
    collected = store.collect("tiny", [], trusted_before=accepted, window=window)
    trusted = [i for i, t in zip(ids(collected.eval), collected.eval.column("trusted").to_pylist()) if t]
    recent = {i for t in types for i in [e for n, e in enumerate(evals[:30]) if types[n % 3] == t][-3:]}
    assert set(trusted) == recent | set(evals[:2])  # 3 most recent per type + the 2 oldest
    assert trusted[:2] == evals[:2]  # oldest first: the anchors lead, so prompt-gain partners stay put
    assert set(ids(collected.eval)) - set(trusted) == set(evals[30:])  # every row that arrived with the batch
    assert collected.window_record() == {
        "per_type": 3, "anchors": 2, "eval_rows_available": 40, "trusted_eval_rows_available": 30,
        "eval_rows_scored": 21, "trusted_eval_rows_scored": 11, "rejected_rows_available": 0, "rejected_rows_scored": 0,
    }  # fmt: skip


def test_a_bounded_window_moves_by_the_rows_that_became_trusted_but_anchors_stay(store: FeedbackStore) -> None:
    evals = ids_in("eval", 30, "e")
    store.add_many([row(i, minute=n) for n, i in enumerate(evals[:20])])
    first_accepted = datetime.now(UTC)
    store.add_many([row(i, minute=100 + n) for n, i in enumerate(evals[20:])])
    second_accepted = datetime.now(UTC)
    window = EvalWindow(per_type=5, anchors=3)
    before = store.collect("tiny", [], trusted_before=first_accepted, window=window)
    after = store.collect("tiny", [], trusted_before=second_accepted, window=window)
    assert ids(before.eval)[:3] == ids(after.eval)[:3] == evals[:3]
    assert set(ids(after.eval)) == set(evals[:3]) | set(evals[25:])


def test_the_dataset_plan_fetches_only_the_sampled_replay_rows(store: FeedbackStore) -> None:
    train = ids_in("train", 30, "t")
    store.add_many([row(i, minute=n) for n, i in enumerate(train)])
    store.record_consumption("tiny", V1, new_ids=train[:25], replay_ids=[])
    collected = store.collect("tiny", [V1])
    asked: list[list[str]] = []

    def fetch(wanted):
        asked.append(list(wanted))
        return store.rows("tiny", wanted)

    plan = plan_dataset(collected, DataSettings(replay_ratio=1.0, min_replay_rows=0), seed=0, fetch_rows=fetch)
    assert plan.new_ids == tuple(train[25:]) and len(plan.replay_ids) == 5
    assert asked == [list(plan.replay_ids)] and set(plan.replay_ids) <= set(train[:25])
    # Same inputs, same sample.
    again = plan_dataset(store.collect("tiny", [V1]), DataSettings(replay_ratio=1.0, min_replay_rows=0), seed=0, fetch_rows=fetch)
    assert again.replay_ids == plan.replay_ids


@pytest.mark.parametrize(
    "ratio,minimum,replayed",
    [(1.0, 12, 12), (1.0, 3, 5), (1.0, 100, 25), (0.0, 12, 0), (2.0, 0, 10)],
    ids=["a small batch gets the minimum", "a larger share wins", "no more than was learned", "ratio 0: none", "ratio alone"],
)
def test_a_small_batch_is_replayed_against_at_least_min_replay_rows(store: FeedbackStore, ratio, minimum, replayed) -> None:
    train = ids_in("train", 30, "t")
    store.add_many([row(i, minute=n) for n, i in enumerate(train)])
    store.record_consumption("tiny", V1, new_ids=train[:25], replay_ids=[])
    data = DataSettings(replay_ratio=ratio, min_replay_rows=minimum)
    plan = plan_dataset(store.collect("tiny", [V1]), data, seed=0, fetch_rows=lambda wanted: store.rows("tiny", wanted))
    assert len(plan.new_ids) == 5 and len(plan.replay_ids) == replayed


def test_a_plan_rebuilt_from_its_ids_has_the_same_hashes(store: FeedbackStore) -> None:
    train, evals = ids_in("train", 12, "t"), ids_in("eval", 6, "e")
    store.add_many([row(i, minute=n) for n, i in enumerate(train[:8] + evals[:4])])
    store.add_many([row(evals[4], minute=50, rating="needs_improvement", correction="fixed"),
                    row(train[8], minute=51, rating="needs_improvement")])  # fmt: skip
    store.record_consumption("tiny", V1, new_ids=train[:6], replay_ids=[])
    accepted = datetime.now(UTC)
    store.add_many([row(i, minute=60 + n) for n, i in enumerate(train[9:] + evals[5:])])
    collected = store.collect("tiny", [V1], trusted_before=accepted)
    plan = plan_dataset(collected, DataSettings(), seed=3, fetch_rows=lambda wanted: store.rows("tiny", wanted))
    rebuilt = rebuild_plan(
        new_ids=plan.new_ids, replay_ids=plan.replay_ids, eval_ids=plan.eval_ids, rejected_ids=plan.rejected_ids,
        fetch_rows=lambda wanted: store.rows("tiny", wanted), trusted_before=accepted,
    )  # fmt: skip
    assert content_hash(rebuilt.train) == content_hash(plan.train)
    from incremental.dataset import EVAL_COLUMNS

    assert content_hash(rebuilt.eval, EVAL_COLUMNS) == content_hash(plan.eval, EVAL_COLUMNS)
    assert plan.eval.column("rejected_output").to_pylist().count(f"output of {evals[4]}") == 1


def test_the_checked_in_v1_database_migrates_with_its_rows_and_ledger(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    shutil.copy(FIXTURES / "feedback_v1.duckdb", path)
    store = FeedbackStore(path)
    with pytest.raises(FeedbackSchemaError, match=f"v1, this code needs v{SCHEMA_VERSION}"):
        store.collect("tiny", [])
    store.init()
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "runs" not in tables and {"feedback", "version_rows", "row_marks", "score_cache", "learned_rows"} <= tables
    counts = store.counts("tiny", [V2, V1])
    # v1 wrote eval and rejected rows into the ledger too: they are neither learned nor new.
    assert (counts.total, counts.learned, counts.new, counts.eval, counts.rejected) == (40, 15, 13, 8, 4)
    assert store.counts("tiny", [V1]).learned == 10
    store.init()  # idempotent
