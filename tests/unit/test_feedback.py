"""The feedback store on real DuckDB files: validation, split, lineage semantics, schema, locking."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import incremental.feedback.database as feedback
from incremental.errors import IncrementalError
from incremental.feedback import (
    SCHEMA_VERSION,
    FeedbackCounts,
    FeedbackInput,
    FeedbackSchemaError,
    FeedbackStore,
    FeedbackStoreLockedError,
)

from conftest import feedback_row, held_by_another_process, ids_in

REPO_ROOT = Path(__file__).resolve().parents[2]
V1 = "v1_20250101_000000"
V2 = "v2_20250102_000000"
V3 = "v3_20250103_000000"


row = feedback_row


def ids(table: pa.Table) -> list[str]:
    return table["id"].to_pylist()


def meta(path: Path) -> dict[str, str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())
    finally:
        con.close()


# -- schema -----------------------------------------------------------------------------------


def test_init_records_schema_version_and_share_and_is_idempotent(store: FeedbackStore) -> None:
    store.add(row(id="kept"))
    store.init()
    assert meta(store.path) == {"schema_version": str(SCHEMA_VERSION), "eval_share": "0.2"}
    assert store.counts("tiny", []).total == 1


def test_newer_schema_is_refused_untouched(store: FeedbackStore) -> None:
    con = duckdb.connect(str(store.path))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(FeedbackSchemaError, match=r"newer .*upgrade"):
        store.init()
    with pytest.raises(FeedbackSchemaError, match="newer"):
        store.add(row())
    with pytest.raises(FeedbackSchemaError, match="newer"):
        store.collect("tiny", [])
    assert meta(store.path)["schema_version"] == str(SCHEMA_VERSION + 1)


def test_older_schema_is_migrated_by_init_and_refused_before(store: FeedbackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add(row(id="old-row"))
    step = ("ALTER TABLE feedback ADD COLUMN note VARCHAR",)
    monkeypatch.setattr(feedback, "_MIGRATIONS", (*feedback._MIGRATIONS, step))
    monkeypatch.setattr(feedback, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(FeedbackSchemaError, match="init"):
        store.collect("tiny", [])
    store.init()
    assert meta(store.path)["schema_version"] == str(SCHEMA_VERSION + 1)
    con = duckdb.connect(str(store.path), read_only=True)
    assert con.execute("SELECT id, note FROM feedback").fetchall() == [("old-row", None)]
    con.close()


def test_failed_migration_leaves_the_database_as_it_was(store: FeedbackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = ("ALTER TABLE feedback ADD COLUMN note VARCHAR", "SELECT * FROM no_such_table")
    monkeypatch.setattr(feedback, "_MIGRATIONS", (*feedback._MIGRATIONS, broken))
    monkeypatch.setattr(feedback, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(duckdb.CatalogException):
        store.init()
    assert meta(store.path)["schema_version"] == str(SCHEMA_VERSION)
    con = duckdb.connect(str(store.path), read_only=True)
    columns = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'feedback'").fetchall()
    con.close()
    assert ("note",) not in columns


def test_missing_database_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "typo.duckdb"
    with pytest.raises(FeedbackSchemaError, match=r"init\(\)"):
        FeedbackStore(path).add(row())
    with pytest.raises(FeedbackSchemaError, match=r"init\(\)"):
        FeedbackStore(path).collect("tiny", [])
    assert not path.exists()


# -- adding and validating --------------------------------------------------------------------


def test_add_and_collect_sort_rows_into_buckets_with_targets(store: FeedbackStore) -> None:
    good, corrected, uncorrected = ids_in("train", 3)
    (held_out,) = ids_in("eval", 1)
    store.add(row(id=good, output="good output"))
    store.add(FeedbackInput(**row(id=corrected, rating="needs_improvement", output="bad", correction="fixed")))
    store.add(row(id=uncorrected, rating="needs_improvement", output="bad too"))
    store.add(row(id=held_out, output="held out"))

    collected = store.collect("tiny", [])

    assert dict(zip(ids(collected.new), collected.new["target"].to_pylist(), strict=True)) == {
        good: "good output",
        corrected: "fixed",
    }
    assert ids(collected.learned) == []
    assert collected.eval["target"].to_pylist() == ["held out"]
    assert collected.rejected["target"].to_pylist() == ["bad too"]
    for table in (collected.new, collected.eval, collected.rejected):
        assert {"id", "artifact_type", "prompt", "target", "rejected_output", "rating", "created_at", "trusted"} <= set(table.column_names)
        assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    # The replay pool comes back as ids: no text is read for rows a run may not use.
    assert collected.learned.column_names == ["id", "created_at"]
    assert store.counts("tiny", []) == FeedbackCounts(total=4, new=2, learned=0, eval=1, rejected=1)
    assert store.collect("other-model", []).new.num_rows == 0


def test_collect_orders_by_created_at_then_id(store: FeedbackStore) -> None:
    first, second, third = ids_in("train", 3, prefix="order")
    base = datetime(2025, 1, 1, tzinfo=UTC)
    store.add_many([
        row(id=third, created_at=base + timedelta(hours=1)),
        row(id=second, created_at=base),
        row(id=first, created_at=base),
    ])
    assert ids(store.collect("tiny", []).new) == sorted([first, second]) + [third]


# -- split ------------------------------------------------------------------------------------


def test_eval_rows_are_never_new_or_learned(store: FeedbackStore) -> None:
    train = ids_in("train", 4)
    held_out = ids_in("eval", 2)
    store.add_many([row(id=row_id) for row_id in train + held_out])
    with pytest.raises(IncrementalError, match=r"new row .* is a 'eval' row"):
        store.record_consumption("tiny", V1, new_ids=[held_out[0]], replay_ids=[])
    store.record_consumption("tiny", V1, new_ids=train, replay_ids=[])
    collected = store.collect("tiny", [V1])
    assert set(ids(collected.learned)) == set(train)
    assert ids(collected.new) == []
    assert set(ids(collected.eval)) == set(held_out)


# -- lineage ----------------------------------------------------------------------------------


def test_lineage_semantics_rejected_candidates_and_rollback(store: FeedbackStore) -> None:
    first, second = ids_in("train", 2)
    held_out = ids_in("eval", 1)
    store.add_many([row(id=first), row(id=second), row(id=held_out[0])])

    # v1 (accepted) learned `first`.
    store.record_consumption("tiny", V1, new_ids=[first], replay_ids=[])
    at_v1 = store.collect("tiny", [V1])
    assert (ids(at_v1.new), ids(at_v1.learned)) == ([second], [first])

    # v2 (a rejected child of v1) trained on `second` and replayed `first`: never in a lineage.
    store.record_consumption("tiny", V2, new_ids=[second], replay_ids=[first])
    still_v1 = store.collect("tiny", [V1])
    assert (ids(still_v1.new), ids(still_v1.learned)) == ([second], [first])

    # v3 (accepted child of v1) learned `second`.
    store.record_consumption("tiny", V3, new_ids=[second], replay_ids=[first])
    at_v3 = store.collect("tiny", [V3, V1])
    assert ids(at_v3.new) == []
    assert set(ids(at_v3.learned)) == {first, second}

    # Rolling back to v1 makes what only v3 learned new again; base mode sees everything as new.
    rolled_back = store.collect("tiny", [V1])
    assert (ids(rolled_back.new), ids(rolled_back.learned)) == ([second], [first])
    assert set(ids(store.collect("tiny", []).new)) == {first, second}
    assert store.counts("tiny", [V3, V1]) == FeedbackCounts(total=3, new=0, learned=2, eval=1, rejected=0)
    # A replayed row counts as consumed by the version that replayed it, like a new one.
    assert set(ids(store.collect("tiny", [V2]).learned)) == {first, second}


def test_consumption_of_other_model_does_not_count(store: FeedbackStore) -> None:
    (shared_id,) = ids_in("train", 1)
    store.add(row(id=shared_id))
    with pytest.raises(IncrementalError, match="not a feedback row of model 'other'"):
        store.record_consumption("other", V1, new_ids=[shared_id], replay_ids=[])
    assert ids(store.collect("tiny", [V1]).new) == [shared_id]


def test_row_committed_after_collect_is_new_next_time(store: FeedbackStore) -> None:
    early, late = ids_in("train", 2)
    store.add(row(id=early, created_at=datetime(2025, 1, 2, tzinfo=UTC)))
    collected = store.collect("tiny", [])
    # Committed during the run, with an older timestamp than the row the run saw.
    store.add(row(id=late, created_at=datetime(2025, 1, 1, tzinfo=UTC)))
    store.record_consumption("tiny", V1, new_ids=ids(collected.new), replay_ids=[])
    assert ids(store.collect("tiny", [V1]).new) == [late]


def test_record_consumption_is_idempotent_and_immutable(store: FeedbackStore) -> None:
    first, second = ids_in("train", 2)
    (uncorrected,) = ids_in("train", 1, prefix="uncorrected")
    store.add_many([row(id=first), row(id=second), row(id=uncorrected, rating="needs_improvement")])
    for _ in range(2):
        store.record_consumption("tiny", V1, new_ids=[first], replay_ids=[])
    con = duckdb.connect(str(store.path), read_only=True)
    assert con.execute("SELECT count(*) FROM version_rows").fetchall() == [(1,)]
    con.close()
    assert store.trained_on("tiny", V1) == {"new": (first,), "replay": ()}
    with pytest.raises(IncrementalError, match="immutable"):
        store.record_consumption("tiny", V1, new_ids=[first, second], replay_ids=[])
    with pytest.raises(IncrementalError, match=r"new row .* is a 'rejected' row; new rows must be 'train' rows"):
        store.record_consumption("tiny", V2, new_ids=[uncorrected], replay_ids=[])
    with pytest.raises(ValueError, match="both 'new' and 'replay'"):
        store.record_consumption("tiny", V2, new_ids=[second], replay_ids=[second])
    assert ids(store.collect("tiny", [V1]).new) == [second]


# -- locking and imports ----------------------------------------------------------------------

def test_waits_for_a_process_that_holds_the_lock(store: FeedbackStore) -> None:
    with held_by_another_process(store.path, 1.0) as holder:
        began = time.monotonic()
        added = store.add(row())
        waited = time.monotonic() - began
        assert holder.wait(timeout=10) == 0
    assert waited > 0.5
    collected = store.collect("tiny", [])
    assert added in ids(collected.new) + ids(collected.eval)


@pytest.mark.parametrize("operation", ["add", "collect"])
def test_lock_timeout_raises_a_clear_error(store: FeedbackStore, operation: str) -> None:
    impatient = FeedbackStore(store.path, lock_timeout_s=0.3)
    with held_by_another_process(store.path, 30.0):
        began = time.monotonic()
        with pytest.raises(FeedbackStoreLockedError) as refused:
            impatient.add(row()) if operation == "add" else impatient.collect("tiny", [])
        assert 0.3 <= time.monotonic() - began < 5.0
    message = str(refused.value)
    assert str(store.path) in message
    assert re.search(r"process \d+ \(.*python.*\) holds it", message), message
    assert "retry" in message


def test_module_imports_neither_torch_nor_prefect() -> None:
    code = "import sys, incremental.feedback; print(sorted(m for m in ('torch', 'prefect') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
