"""The feedback store on real DuckDB files: validation, split, lineage semantics, schema, locking."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import incremental.feedback as feedback
from incremental.errors import IncrementalError, InvalidFeedbackError
from incremental.feedback import (
    SCHEMA_VERSION,
    FeedbackInput,
    FeedbackSchemaError,
    FeedbackStore,
    FeedbackStoreLockedError,
    split_for,
)

from conftest import ids_in

REPO_ROOT = Path(__file__).resolve().parents[2]
V1 = "v1_20250101_000000"
V2 = "v2_20250102_000000"
V3 = "v3_20250103_000000"
MISSING = object()


def row(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "model": "tiny",
        "artifact_type": "erd",
        "prompt": "Customers place orders; an order has many items.",
        "output": "erDiagram CUSTOMER ||--o{ ORDER : places",
        "rating": "good",
    }
    fields.update(overrides)
    return {key: value for key, value in fields.items() if value is not MISSING}


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    created = FeedbackStore(tmp_path / "feedback.duckdb", lock_timeout_s=5.0)
    created.init()
    return created


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
    for table in (collected.new, collected.learned, collected.eval, collected.rejected):
        assert {"id", "artifact_type", "prompt", "target", "rating", "created_at"} <= set(table.column_names)
        assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert store.counts("tiny", []) == feedback.FeedbackCounts(total=4, new=2, learned=0, eval=1, rejected=1)
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


def test_created_at_naive_is_utc_and_aware_is_converted(store: FeedbackStore) -> None:
    naive, aware = ids_in("train", 2)
    store.add(row(id=naive, created_at=datetime(2025, 1, 1, 12, 0)))
    store.add(row(id=aware, created_at=datetime(2025, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))))
    times = store.collect("tiny", []).new["created_at"].to_pylist()
    assert [t.astimezone(UTC) for t in times] == [datetime(2025, 1, 1, 12, 0, tzinfo=UTC)] * 2


INVALID = [
    pytest.param({"model": "Tiny Model"}, "model", id="model-pattern"),
    pytest.param({"model": MISSING}, "model", id="model-missing"),
    pytest.param({"artifact_type": "sql"}, "artifact_type", id="artifact_type"),
    pytest.param({"prompt": "   "}, "prompt", id="prompt-blank"),
    pytest.param({"output": ""}, "output", id="output-empty"),
    pytest.param({"output": 42}, "output", id="output-type"),
    pytest.param({"rating": "meh"}, "rating", id="rating"),
    pytest.param({"rating": "needs_improvement", "correction": " "}, "correction", id="correction-empty"),
    pytest.param({"correction": "fixed"}, "correction", id="correction-with-good"),
    pytest.param({"source": ""}, "source", id="source"),
    pytest.param({"generated_by": "latest"}, "generated_by", id="generated_by"),
    pytest.param({"created_at": "yesterday"}, "created_at", id="created_at"),
    pytest.param({"id": "has space"}, "id", id="id"),
    pytest.param({"score": 5}, "score", id="unknown-field"),
]


@pytest.mark.parametrize(("overrides", "field"), INVALID)
def test_invalid_field_is_named_and_nothing_is_stored(store: FeedbackStore, overrides: dict, field: str) -> None:
    with pytest.raises(InvalidFeedbackError, match=f"field '{field}'") as refused:
        store.add(row(**overrides))
    assert "nothing was stored" in str(refused.value)
    with pytest.raises(InvalidFeedbackError, match=rf"rows\[1\]: field '{field}'"):
        store.add_many([row(id="valid-first"), row(**overrides), row(id="valid-last")])
    assert store.counts("tiny", []).total == 0


def test_correction_with_good_rating_says_why(store: FeedbackStore) -> None:
    with pytest.raises(InvalidFeedbackError, match="only accepted with rating 'needs_improvement'"):
        store.add(row(correction="fixed"))


def test_duplicate_ids_are_refused(store: FeedbackStore) -> None:
    assert store.add(row(id="taken")) == "taken"
    with pytest.raises(InvalidFeedbackError, match="'taken' is already stored"):
        store.add(row(id="taken", output="other"))
    with pytest.raises(InvalidFeedbackError, match=r"rows\[1\]: field 'id'"):
        store.add_many([row(id="fresh"), row(id="taken")])
    with pytest.raises(InvalidFeedbackError, match=r"rows\[1\]: field 'id': 'twice' is already used by rows\[0\]"):
        store.add_many([row(id="twice"), row(id="twice")])
    assert store.counts("tiny", []).total == 1


def test_generated_ids_are_unique_and_returned(store: FeedbackStore) -> None:
    added = store.add_many([row(), row()])
    assert len(set(added)) == 2
    collected = store.collect("tiny", [])
    assert set(ids(collected.new) + ids(collected.eval)) == set(added)


# -- import -----------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_import_jsonl_fills_defaults_and_skips_blank_lines(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "feedback.jsonl",
        [row(id="a"), "", row(id="b", model=MISSING), "   ", row(id="c", source="ui")],
    )
    report = store.import_file(path, default_model="tiny")
    assert report.ids == ("a", "b", "c")
    assert report.blank_lines == 2
    collected = store.collect("tiny", [])
    every = pa.concat_tables([collected.new, collected.eval])
    assert dict(zip(ids(every), every["source"].to_pylist(), strict=True)) == {"a": "import", "b": "import", "c": "ui"}


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        pytest.param(row(id="c", rating="meh"), "field 'rating'", id="invalid-field"),
        pytest.param('{"id": "c", "rating": ', "not valid JSON", id="bad-json"),
        pytest.param("[1, 2]", "expected an object", id="not-an-object"),
        pytest.param(row(id="a"), "field 'id'", id="duplicate-in-file"),
    ],
)
def test_import_with_bad_line_3_stores_nothing(store: FeedbackStore, tmp_path: Path, bad_line: object, expected: str) -> None:
    path = write_jsonl(tmp_path / "feedback.jsonl", [row(id="a"), row(id="b"), bad_line, row(id="d")])
    with pytest.raises(InvalidFeedbackError, match=expected) as refused:
        store.import_file(path)
    assert f"{path}:3: " in str(refused.value)
    assert f"{path}:1: " not in str(refused.value)
    assert store.counts("tiny", []).total == 0


def test_import_names_line_of_missing_model_and_of_id_already_stored(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "feedback.jsonl", [row(id="x", model=MISSING)])
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:1: field 'model': Field required"):
        store.import_file(path)
    store.add(row(id="taken"))
    path = write_jsonl(tmp_path / "again.jsonl", [row(id="new-one"), row(id="taken")])
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:2: field 'id': 'taken' is already stored"):
        store.import_file(path)
    assert store.counts("tiny", []).total == 1


def test_import_refuses_unknown_extension_listing_supported(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_text("model,rating\n")
    with pytest.raises(InvalidFeedbackError, match=r"unsupported file type '\.csv'; supported: \.jsonl"):
        store.import_file(path)


# -- split ------------------------------------------------------------------------------------


def test_split_is_stored_stable_and_the_databases_share_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "feedback.duckdb"
    all_ids = [f"row-{number}" for number in range(200)]
    first = FeedbackStore(path, eval_share=0.2)
    first.init()
    first.add_many([row(id=row_id) for row_id in all_ids[:100]])

    reopened = FeedbackStore(path, eval_share=0.6)
    with caplog.at_level(logging.WARNING, logger="incremental.feedback"):
        reopened.init()
    assert "keeps its eval share 0.2" in caplog.text
    reopened.add_many([row(id=row_id) for row_id in all_ids[100:]])
    # The test means something only if 0.6 would have put some of these rows on the other side.
    assert any(split_for(r, 0.6) != split_for(r, 0.2) for r in all_ids[100:])

    expected_eval = {row_id for row_id in all_ids if split_for(row_id, 0.2) == "eval"}
    assert 20 <= len(expected_eval) <= 60
    for _ in range(2):  # the same answer from a fresh store object
        collected = FeedbackStore(path, eval_share=0.5).collect("tiny", [])
        assert set(ids(collected.eval)) == expected_eval
        assert set(ids(collected.new)) == set(all_ids) - expected_eval
        assert set(collected.eval["split"].to_pylist()) == {"eval"}


def test_eval_rows_are_never_new_or_learned(store: FeedbackStore) -> None:
    train = ids_in("train", 4)
    held_out = ids_in("eval", 2)
    store.add_many([row(id=row_id) for row_id in train + held_out])
    with pytest.raises(IncrementalError, match=r"new row .* is a 'eval' row"):
        store.record_consumption("tiny", V1, new_ids=[held_out[0]], replay_ids=[], eval_ids=[])
    store.record_consumption("tiny", V1, new_ids=train, replay_ids=[], eval_ids=held_out)
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
    store.record_consumption("tiny", V1, new_ids=[first], replay_ids=[], eval_ids=held_out)
    at_v1 = store.collect("tiny", [V1])
    assert (ids(at_v1.new), ids(at_v1.learned)) == ([second], [first])

    # v2 (a rejected child of v1) trained on `second` and replayed `first`: never in a lineage.
    store.record_consumption("tiny", V2, new_ids=[second], replay_ids=[first], eval_ids=held_out)
    still_v1 = store.collect("tiny", [V1])
    assert (ids(still_v1.new), ids(still_v1.learned)) == ([second], [first])

    # v3 (accepted child of v1) learned `second`.
    store.record_consumption("tiny", V3, new_ids=[second], replay_ids=[first], eval_ids=held_out)
    at_v3 = store.collect("tiny", [V3, V1])
    assert ids(at_v3.new) == []
    assert set(ids(at_v3.learned)) == {first, second}

    # Rolling back to v1 makes what only v3 learned new again; base mode sees everything as new.
    rolled_back = store.collect("tiny", [V1])
    assert (ids(rolled_back.new), ids(rolled_back.learned)) == ([second], [first])
    assert set(ids(store.collect("tiny", []).new)) == {first, second}
    assert store.counts("tiny", [V3, V1]) == feedback.FeedbackCounts(total=3, new=0, learned=2, eval=1, rejected=0)
    # A replayed row counts as consumed by the version that replayed it, like a new one.
    assert set(ids(store.collect("tiny", [V2]).learned)) == {first, second}


def test_consumption_of_other_model_does_not_count(store: FeedbackStore) -> None:
    (shared_id,) = ids_in("train", 1)
    store.add(row(id=shared_id))
    with pytest.raises(IncrementalError, match="not a feedback row of model 'other'"):
        store.record_consumption("other", V1, new_ids=[shared_id], replay_ids=[], eval_ids=[])
    assert ids(store.collect("tiny", [V1]).new) == [shared_id]


def test_row_committed_after_collect_is_new_next_time(store: FeedbackStore) -> None:
    early, late = ids_in("train", 2)
    store.add(row(id=early, created_at=datetime(2025, 1, 2, tzinfo=UTC)))
    collected = store.collect("tiny", [])
    # Committed during the run, with an older timestamp than the row the run saw.
    store.add(row(id=late, created_at=datetime(2025, 1, 1, tzinfo=UTC)))
    store.record_consumption("tiny", V1, new_ids=ids(collected.new), replay_ids=[], eval_ids=[])
    assert ids(store.collect("tiny", [V1]).new) == [late]


def test_record_consumption_is_idempotent_and_immutable(store: FeedbackStore) -> None:
    first, second = ids_in("train", 2)
    (uncorrected,) = ids_in("train", 1, prefix="uncorrected")
    store.add_many([row(id=first), row(id=second), row(id=uncorrected, rating="needs_improvement")])
    for _ in range(2):
        store.record_consumption("tiny", V1, new_ids=[first], replay_ids=[], eval_ids=[], rejected_ids=[uncorrected])
    con = duckdb.connect(str(store.path), read_only=True)
    assert con.execute("SELECT count(*) FROM version_rows").fetchall() == [(2,)]
    con.close()
    with pytest.raises(IncrementalError, match="immutable"):
        store.record_consumption("tiny", V1, new_ids=[first, second], replay_ids=[], eval_ids=[])
    with pytest.raises(IncrementalError, match=r"rejected row .* must be 'rejected' rows"):
        store.record_consumption("tiny", V2, new_ids=[], replay_ids=[], eval_ids=[], rejected_ids=[second])
    with pytest.raises(ValueError, match="both 'new' and 'replay'"):
        store.record_consumption("tiny", V2, new_ids=[second], replay_ids=[second], eval_ids=[])
    assert ids(store.collect("tiny", [V1]).new) == [second]


# -- runs -------------------------------------------------------------------------------------


def test_run_records_upsert_and_list_newest_first(store: FeedbackStore) -> None:
    started = datetime(2025, 1, 1, tzinfo=UTC)
    store.record_run("run-1", "tiny", status="skipped", reason="no new feedback", started_at=started)
    store.record_run("run-2", "tiny", status="running", started_at=started + timedelta(hours=1))
    store.record_run("run-2", "tiny", status="accepted", version=V2, parent=V1, details={"nll": 1.5})
    runs = store.runs("tiny")
    assert [r.run_id for r in runs] == ["run-2", "run-1"]
    assert runs[0].status == "accepted"
    assert runs[0].started_at == started + timedelta(hours=1)
    assert runs[0].finished_at is not None
    assert (runs[0].version, runs[0].parent, runs[0].details) == (V2, V1, {"nll": 1.5})
    assert runs[1].reason == "no new feedback"
    assert store.runs("tiny", limit=1)[0].run_id == "run-2"
    with pytest.raises(ValueError, match="status 'done'"):
        store.record_run("run-3", "tiny", status="done")  # type: ignore[arg-type]


# -- locking and imports ----------------------------------------------------------------------

HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


@contextmanager
def held_by_another_process(path: Path, seconds: float) -> Iterator[subprocess.Popen]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


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
    assert "another process holds it" in message
    assert "retry" in message


def test_module_imports_neither_torch_nor_prefect() -> None:
    code = "import sys, incremental.feedback; print(sorted(m for m in ('torch', 'prefect') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
