"""Getting feedback in and out on real DuckDB files: the one rule set behind add, add_many and
import_file (JSONL, CSV, Parquet), hostile input, idempotent re-imports, reject files, the split
computed in SQL, and export round trips."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from incremental.errors import InvalidFeedbackError
from incremental.feedback import FeedbackInput, FeedbackStore, split_for

from conftest import write_feedback_file, MISSING, feedback_row, ids_in

FORMATS = ("jsonl", "csv", "parquet")


row = feedback_row


def ids(table: pa.Table) -> list[str]:
    return table["id"].to_pylist()


def stored(store: FeedbackStore, columns: str = "*") -> list[tuple]:
    """Every feedback row, in id order: compared before and after to prove nothing changed."""
    con = duckdb.connect(str(store.path), read_only=True)
    try:
        return con.execute(f"SELECT {columns} FROM feedback ORDER BY id").fetchall()
    finally:
        con.close()


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


write_rows = write_feedback_file


def place(path: Path, index: int) -> str:
    """Where an error names the row at `index` of `write_rows`: a line (after the CSV header) or a Parquet row."""
    if path.suffix == ".parquet":
        return f"{path} row {index + 1}"
    return f"{path}:{index + (2 if path.suffix == '.csv' else 1)}"


# -- the rules, through add and add_many ------------------------------------------------------


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
    pytest.param({"prompt": "\u2028\u3000\x85"}, "prompt", id="prompt-unicode-blank"),
    pytest.param({"output": ""}, "output", id="output-empty"),
    pytest.param({"output": 42}, "output", id="output-number"),
    pytest.param({"output": {"text": "x"}}, "output", id="output-object"),
    pytest.param({"rating": "meh"}, "rating", id="rating"),
    pytest.param({"rating": "needs_improvement", "correction": " "}, "correction", id="correction-empty"),
    pytest.param({"correction": "fixed"}, "correction", id="correction-with-good"),
    pytest.param({"source": ""}, "source", id="source"),
    pytest.param({"generated_by": "latest"}, "generated_by", id="generated_by"),
    pytest.param({"created_at": "yesterday"}, "created_at", id="created_at"),
    pytest.param({"created_at": "infinity"}, "created_at", id="created_at-infinity"),
    pytest.param({"created_at": 1735732800}, "created_at", id="created_at-number"),
    pytest.param({"id": "has space"}, "id", id="id"),
    pytest.param({"id": "x" * 129}, "id", id="id-too-long"),
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


def test_a_message_says_what_is_wrong_shows_the_value_and_the_fix(store: FeedbackStore) -> None:
    with pytest.raises(InvalidFeedbackError) as refused:
        store.add_many([row(), row(rating="meh"), row(output=42)])
    assert str(refused.value) == (
        "nothing was stored; fix these and retry:\n"
        "  rows[1]: field 'rating': is not a rating (got \"meh\"); use 'good' or 'needs_improvement'\n"
        "  rows[2]: field 'output': must be text, got a number (42); pass the generated artifact that was rated"
    )


def test_unknown_field_lists_the_known_ones(store: FeedbackStore) -> None:
    with pytest.raises(InvalidFeedbackError, match=r"field 'score': unknown field; remove it; known fields: id, model, "):
        store.add(row(score=5))


def test_correction_with_good_rating_says_why(store: FeedbackStore) -> None:
    with pytest.raises(InvalidFeedbackError, match="only accepted with rating 'needs_improvement'"):
        store.add(row(correction="fixed"))


def test_a_value_python_cannot_store_is_named(store: FeedbackStore) -> None:
    with pytest.raises(InvalidFeedbackError, match=r"rows\[0\]: field 'prompt': cannot be stored"):
        store.add_many([row(prompt=b"bytes")])
    with pytest.raises(InvalidFeedbackError, match=r"field 'correction': cannot be stored"):
        store.add(row(rating="needs_improvement", correction=float("nan")))


def test_duplicate_ids_are_refused_and_a_retried_add_is_harmless(store: FeedbackStore) -> None:
    assert store.add(row(id="taken")) == "taken"
    assert store.add(row(id="taken")) == "taken"  # the same row again: a retry, stored once
    with pytest.raises(InvalidFeedbackError, match="'taken' is already stored with a different output"):
        store.add(row(id="taken", output="other"))
    with pytest.raises(InvalidFeedbackError, match=r"rows\[1\]: field 'id': 'taken' is already stored"):
        store.add_many([row(id="fresh"), row(id="taken", rating="needs_improvement")])
    with pytest.raises(InvalidFeedbackError, match=r"rows\[1\]: field 'id': 'twice' is already used by rows\[0\]"):
        store.add_many([row(id="twice"), row(id="twice")])
    assert store.counts("tiny", []).total == 1


def test_generated_ids_are_unique_and_returned(store: FeedbackStore) -> None:
    added = store.add_many([row(), row()])
    assert len(set(added)) == 2
    assert all(len(added_id) == 32 for added_id in added)  # uuid4 hex
    collected = store.collect("tiny", [])
    assert set(ids(collected.new) + ids(collected.eval)) == set(added)


def test_feedback_input_is_a_container_and_the_store_checks_it(store: FeedbackStore) -> None:
    unchecked = FeedbackInput(model="tiny", artifact_type="erd", prompt="p", output="o", rating="meh")
    with pytest.raises(InvalidFeedbackError, match="field 'rating'"):
        store.add(unchecked)
    added = store.add(FeedbackInput(model="tiny", artifact_type="api", prompt="p", output="o", rating="good", source="ui"))
    assert stored(store, "id, source") == [(added, "ui")]


def test_add_stores_source_api_by_default(store: FeedbackStore) -> None:
    store.add(row(id="a"))
    assert stored(store, "source") == [("api",)]


# -- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.2, 0.37])
def test_split_computed_in_sql_equals_split_for(tmp_path: Path, share: float) -> None:
    target = FeedbackStore(tmp_path / "feedback.duckdb", eval_share=share)
    target.init()
    row_ids = [f"id-{n}" for n in range(1500)] + [f"ü-{n}-[x]" for n in range(500)] + [f"{n:032x}" for n in range(1000)]
    target.import_file(write_rows(tmp_path / "rows.parquet", [row(id=row_id, prompt=row_id) for row_id in row_ids]))
    target.add_many([row(id=f"api-{n}") for n in range(500)])
    splits = dict(stored(target, "id, split"))
    assert len(splits) == 3500
    assert splits == {row_id: split_for(row_id, share) for row_id in splits}


def test_split_is_stored_stable_and_the_databases_share_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
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
    assert {row_id for row_id, split in stored(reopened, "id, split") if split == "eval"} == expected_eval


def test_a_given_split_must_match_the_databases(store: FeedbackStore) -> None:
    (train_id,) = ids_in("train", 1)
    with pytest.raises(InvalidFeedbackError, match=r"field 'split': is not the split this database computes .*got \"eval\""):
        store.add(row(id=train_id, split="eval"))
    store.add(row(id=train_id, split="train"))


# -- JSONL ------------------------------------------------------------------------------------


def test_import_jsonl_fills_defaults_and_skips_blank_lines(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "feedback.jsonl",
        [row(id="a"), "", row(id="b", model=MISSING), "   ", row(id="c", source="ui")],
    )
    report = store.import_file(path, default_model="tiny")
    assert (report.stored, report.already_stored, report.blank_lines, report.rejected) == (3, 0, 2, 0)
    assert stored(store, "id, model, source") == [("a", "tiny", "import"), ("b", "tiny", "import"), ("c", "tiny", "ui")]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        pytest.param(row(id="c", rating="meh"), "field 'rating'", id="invalid-field"),
        pytest.param('{"id": "c", "rating": ', "not valid JSON", id="bad-json"),
        pytest.param("[1, 2]", "expected an object", id="not-an-object"),
        pytest.param('"just text"', "expected an object", id="a-string"),
        pytest.param(row(id="a"), r"field 'id': 'a' is already used by .*:1", id="duplicate-in-file"),
        pytest.param(row(id="c", prompt=["a", "list"]), "field 'prompt': must be text, got a list", id="wrong-type"),
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
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:1: field 'model': is required; .*default_model"):
        store.import_file(path)
    store.add(row(id="taken"))
    path = write_jsonl(tmp_path / "again.jsonl", [row(id="new-one"), row(id="taken", rating="needs_improvement")])
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:2: field 'id': 'taken' is already stored with a different rating"):
        store.import_file(path)
    assert store.counts("tiny", []).total == 1


def test_jsonl_lines_split_on_newline_only(store: FeedbackStore, tmp_path: Path) -> None:
    separators = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\rh"
    path = tmp_path / "feedback.jsonl"
    path.write_text(
        json.dumps(row(id="sep", prompt=separators), ensure_ascii=False) + "\n" + json.dumps(row(id="bad", rating="meh")) + "\n",
        encoding="utf-8",
        newline="",
    )
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:2: field 'rating'"):
        store.import_file(path)
    path.write_bytes(path.read_bytes().replace(b'"meh"', b'"good"'))
    assert store.import_file(path).stored == 2
    assert dict(stored(store, "id, prompt"))["sep"] == separators


def test_jsonl_with_crlf_line_ends_and_a_byte_order_mark_imports(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(row(id=f"r{n}")).encode() for n in range(3)) + b"\r\n\r\n")
    report = store.import_file(path)
    assert (report.stored, report.blank_lines) == (3, 1)


def test_invalid_utf8_names_its_line(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(json.dumps(row(id="a")).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:2: not UTF-8 text; save the file as UTF-8"):
        store.import_file(path)
    assert store.counts("tiny", []).total == 0


def test_many_problems_list_the_first_ten_and_count_the_rest(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "feedback.jsonl", [row(id=f"r{n}", rating="meh") for n in range(15)])
    with pytest.raises(InvalidFeedbackError) as refused:
        store.import_file(path)
    message = str(refused.value)
    assert message.count("field 'rating'") == 10
    assert f"{path}:10: " in message and f"{path}:11: " not in message
    assert "... and 5 more" in message
    assert "skip_invalid=True" in message


def test_empty_file_is_refused(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(InvalidFeedbackError, match="no feedback rows found"):
        store.import_file(path)


def test_import_refuses_unknown_extension_listing_supported(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.txt"
    path.write_text("model,rating\n")
    with pytest.raises(InvalidFeedbackError, match=r"unsupported file type '\.txt'; supported: \.csv, \.jsonl, \.ndjson, \.parquet"):
        store.import_file(path)


def test_missing_file_is_named(store: FeedbackStore, tmp_path: Path) -> None:
    for suffix in (".jsonl", ".csv", ".parquet"):
        with pytest.raises(InvalidFeedbackError, match="no such file"):
            store.import_file(tmp_path / f"absent{suffix}")


def test_ndjson_is_read_as_jsonl(store: FeedbackStore, tmp_path: Path) -> None:
    assert store.import_file(write_jsonl(tmp_path / "feedback.ndjson", [row(id="a")])).stored == 1


# -- hostile input, in every format that can carry it ---------------------------------------------

TEN_MB = ("0123456789abcdef\n" * (10 * 1024 * 1024 // 17)) + "ünïcödé ✓ 𝛑 end"
VERBATIM = [
    pytest.param({"output": TEN_MB}, id="10MB-output"),
    pytest.param({"prompt": "'); DROP TABLE feedback; --", "output": '"; DELETE FROM feedback; --'}, id="sql-looking"),
    pytest.param({"prompt": "[1, 2] [[x]] $.a[0] {braces}", "output": "[]", "id": "row[1]"}, id="square-brackets"),
    pytest.param({"prompt": 'a "quoted", comma\nand a newline\r\n too', "output": "tab\there"}, id="quotes-commas-newlines"),
    pytest.param({"prompt": "a\u2028b\u2029c\x85d", "output": "NULL"}, id="unicode-line-separators"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("values", VERBATIM)
def test_hostile_text_is_stored_verbatim(store: FeedbackStore, tmp_path: Path, fmt: str, values: dict) -> None:
    rows = [row(id="before"), row(**values), row(id="after")]
    report = store.import_file(write_rows(tmp_path / f"feedback.{fmt}", rows))
    assert report.stored == 3
    by_prompt = {(p, o) for p, o in stored(store, "prompt, output")}
    assert (values.get("prompt", rows[1]["prompt"]), values.get("output", rows[1]["output"])) in by_prompt


REFUSED = [
    ("missing-field", {"prompt": MISSING}, "field 'prompt': is required", FORMATS),
    ("unknown-rating", {"rating": "excellent"}, "field 'rating': is not a rating", FORMATS),
    ("unknown-artifact-type", {"artifact_type": "sql"}, "field 'artifact_type': is not an artifact type", FORMATS),
    ("empty-prompt", {"prompt": "  \t "}, "field 'prompt': must not be empty or only whitespace", FORMATS),
    ("bad-time", {"created_at": "2025-13-45"}, "field 'created_at': is not an ISO 8601 time", FORMATS),
    ("number-for-text", {"output": 42}, "field 'output': must be text, got a number", ("jsonl",)),
    ("object-for-text", {"source": {"a": 1}}, "field 'source': must be text, got an object", ("jsonl",)),
    ("unknown-field", {"score": 5}, "field 'score': unknown field", ("jsonl",)),
]


@pytest.mark.parametrize(
    ("fmt", "values", "expected"),
    [pytest.param(fmt, values, expected, id=f"{name}-{fmt}") for name, values, expected, formats in REFUSED for fmt in formats],
)
def test_bad_row_is_named_and_the_database_is_unchanged(
    store: FeedbackStore, tmp_path: Path, fmt: str, values: dict, expected: str
) -> None:
    store.add(row(id="already-here"))
    before = stored(store)
    path = write_rows(tmp_path / f"feedback.{fmt}", [row(id="a"), row(id="b", **values), row(id="c")])
    with pytest.raises(InvalidFeedbackError, match=expected) as refused:
        store.import_file(path)
    assert f"{place(path, 1)}: {expected}" in str(refused.value)
    assert stored(store) == before


# -- CSV --------------------------------------------------------------------------------------


def test_csv_quoted_newlines_keep_line_numbers_right(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_text(
        "id,model,artifact_type,prompt,output,rating,correction\n"
        'a,tiny,erd,"two\nlines, and a ""quote""",o,good,\n'
        "\n"
        "b,tiny,erd,p,o,meh,\n",
        encoding="utf-8",
    )
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:5: field 'rating'"):
        store.import_file(path)
    path.write_text(path.read_text().replace("meh", "needs_improvement"))
    report = store.import_file(path)
    assert (report.stored, report.blank_lines) == (2, 1)
    assert stored(store, "id, prompt, correction") == [("a", 'two\nlines, and a "quote"', None), ("b", "p", None)]


def test_csv_with_crlf_line_ends_imports(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_bytes(b"id,model,artifact_type,prompt,output,rating\r\na,tiny,erd,\"p\r\nq\",o,good\r\n\r\nb,tiny,erd,p,o,meh\r\n")
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:5: field 'rating'"):
        store.import_file(path)
    path.write_bytes(path.read_bytes().replace(b"meh", b"good"))
    assert store.import_file(path).stored == 2
    assert stored(store, "id, prompt, rating") == [("a", "p\r\nq", "good"), ("b", "p", "good")]


def test_csv_row_with_an_extra_value_is_named_by_line(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_text("model,artifact_type,prompt,output,rating\ntiny,erd,p,o,good\ntiny,erd,p,o,good,extra\n")
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:3: has 6 values, the header names 5 columns"):
        store.import_file(path)
    assert store.counts("tiny", []).total == 0


def test_csv_unknown_column_is_refused_naming_the_known_ones(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_rows(tmp_path / "feedback.csv", [row(id="a", score="5")])
    with pytest.raises(InvalidFeedbackError, match=r"unknown column 'score'; remove or rename it \(known columns: id, model"):
        store.import_file(path)


def test_csv_needs_a_header_line(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_text("tiny,erd,p,o,good\n")
    with pytest.raises(InvalidFeedbackError, match="unknown column 'tiny'.*first line must name its columns"):
        store.import_file(path)


def test_csv_empty_cell_is_null_for_optional_fields(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_text("id,model,artifact_type,prompt,output,rating,correction,generated_by,created_at,source\na,tiny,erd,p,o,good,,,,\n")
    store.import_file(path)
    assert stored(store, "correction, generated_by, source") == [(None, None, "import")]


def test_csv_invalid_utf8_and_an_unclosed_quote_are_named(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "feedback.csv"
    path.write_bytes(b"model,artifact_type,prompt,output,rating\ntiny,erd,caf\xe9,o,good\ntiny,erd,\"open,o,good\n")
    with pytest.raises(InvalidFeedbackError) as refused:
        store.import_file(path)
    assert f"{path}:2: not UTF-8 text" in str(refused.value)
    assert f"{path}:3: a quoted value is not closed" in str(refused.value)


# -- Parquet ----------------------------------------------------------------------------------


def test_parquet_timestamp_column_is_accepted_naive_as_utc(store: FeedbackStore, tmp_path: Path) -> None:
    rows = pa.Table.from_pylist([row(id="naive"), row(id="aware")])
    naive = pa.array([datetime(2025, 1, 1, 12), datetime(2025, 1, 1, 12)], pa.timestamp("ms"))
    pq.write_table(rows.append_column("created_at", naive), tmp_path / "naive.parquet")
    store.import_file(tmp_path / "naive.parquet")
    assert {t.astimezone(UTC) for (t,) in stored(store, "created_at")} == {datetime(2025, 1, 1, 12, tzinfo=UTC)}


def test_parquet_column_of_the_wrong_type_is_refused(store: FeedbackStore, tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([row(output=1)]), tmp_path / "feedback.parquet")
    with pytest.raises(InvalidFeedbackError, match=r"column 'output' is BIGINT; store text"):
        store.import_file(tmp_path / "feedback.parquet")


def test_parquet_missing_column_is_refused_before_reading_rows(store: FeedbackStore, tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([row(rating=MISSING)]), tmp_path / "feedback.parquet")
    with pytest.raises(InvalidFeedbackError, match=r"no column 'rating'; add it"):
        store.import_file(tmp_path / "feedback.parquet")


def test_a_file_that_is_not_parquet_is_refused(store: FeedbackStore, tmp_path: Path) -> None:
    (tmp_path / "feedback.parquet").write_text("not parquet")
    with pytest.raises(InvalidFeedbackError, match="not a Parquet file DuckDB can read"):
        store.import_file(tmp_path / "feedback.parquet")


# -- importing again, duplicates, rejects ----------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_importing_the_same_file_twice_changes_nothing(store: FeedbackStore, tmp_path: Path, fmt: str) -> None:
    rows = [row(prompt=f"notes {n}") for n in range(5)] + [row(id="given", created_at="2025-01-01T00:00:00Z")]
    path = write_rows(tmp_path / f"feedback.{fmt}", rows)
    first = store.import_file(path)
    before = stored(store)
    second = store.import_file(path)
    assert (first.stored, first.already_stored) == (6, 0)
    assert (second.stored, second.already_stored) == (0, 6)
    assert stored(store) == before


def test_ids_derived_from_content_are_the_same_in_every_format(tmp_path: Path) -> None:
    rows = [row(prompt="a"), row(prompt="b", rating="needs_improvement", correction="fixed")]
    found = []
    for fmt in FORMATS:
        target = FeedbackStore(tmp_path / f"{fmt}.duckdb")
        target.init()
        target.import_file(write_rows(tmp_path / f"feedback.{fmt}", rows))
        found.append(stored(target, "id"))
    assert found[0] == found[1] == found[2]


def test_the_same_content_twice_in_one_file_names_both_lines(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "feedback.jsonl", [row(), row(prompt="other"), row()])
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:3: the same content as {path}:1 \(a row without an id"):
        store.import_file(path)


def test_skip_invalid_stores_good_rows_and_writes_the_rest_beside_the_file(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [row(id="a"), row(id="b", rating="meh"), "{broken", row(id="d")])
    report = store.import_file(path, skip_invalid=True)
    assert (report.stored, report.rejected, report.rejected_path) == (2, 2, tmp_path / "in.rejected.jsonl")
    assert stored(store, "id") == [("a",), ("d",)]
    rejects = [json.loads(line) for line in report.rejected_path.read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3]
    assert rejects[0]["record"] == row(id="b", rating="meh")
    assert rejects[0]["problems"] == ["field 'rating': is not a rating (got \"meh\"); use 'good' or 'needs_improvement'"]
    assert rejects[1]["record"] is None and rejects[1]["raw"] == "{broken"
    assert "not valid JSON" in rejects[1]["problems"][0]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_skip_invalid_keeps_the_record_as_read(store: FeedbackStore, tmp_path: Path, fmt: str) -> None:
    path = write_rows(tmp_path / f"in.{fmt}", [row(id="a"), row(id="b", artifact_type="sql")])
    report = store.import_file(path, skip_invalid=True)
    (reject,) = [json.loads(line) for line in (tmp_path / "in.rejected.jsonl").read_text().splitlines()]
    assert (report.stored, report.rejected) == (1, 1)
    assert reject["record"]["artifact_type"] == "sql" and reject["record"]["id"] == "b"
    assert reject["line"] == (3 if fmt == "csv" else 2)


def test_skip_invalid_with_a_malformed_csv_record_reads_the_rest(store: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,model,artifact_type,prompt,output,rating\na,tiny,erd,p,o,good\nb,tiny,erd,p,o,good,extra\nc,tiny,erd,p,o,good\n")
    report = store.import_file(path, skip_invalid=True)
    assert (report.stored, report.rejected) == (2, 1)
    (reject,) = [json.loads(line) for line in (tmp_path / "in.rejected.jsonl").read_text().splitlines()]
    assert (reject["line"], reject["raw"]) == (3, "b,tiny,erd,p,o,good,extra")
    assert stored(store, "id") == [("a",), ("c",)]


# -- export -----------------------------------------------------------------------------------


def some_feedback(store: FeedbackStore) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    store.add_many([
        row(id="b", created_at=base),
        row(id="a", created_at=base, rating="needs_improvement", correction="fixed\nline"),
        row(id="c", created_at=base - timedelta(days=1), generated_by="v1_20250101_000000", source="ui"),
        row(id="d", model="other", prompt="ünï\u2028cödé [x] '); --", output='"quoted"'),
    ])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_then_import_into_a_fresh_database_gives_the_same_rows(store: FeedbackStore, tmp_path: Path, suffix: str) -> None:
    some_feedback(store)
    path = tmp_path / f"export{suffix}"
    assert store.export(path) == 4
    fresh = FeedbackStore(tmp_path / "fresh.duckdb")
    fresh.init()
    report = fresh.import_file(path)
    assert (report.stored, report.rejected) == (4, 0)
    # ingested_at is when a database received the row (it decides trust), so the new one sets its own.
    columns = "id, model, artifact_type, prompt, output, rating, correction, source, generated_by, created_at, split"
    assert stored(fresh, columns) == stored(store, columns)
    assert fresh.import_file(path).already_stored == 4


def test_export_orders_by_created_at_then_id_and_filters_by_model(store: FeedbackStore, tmp_path: Path) -> None:
    some_feedback(store)
    assert store.export(tmp_path / "tiny.jsonl", model="tiny") == 3
    exported = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["id"] for r in exported] == ["c", "a", "b"]
    assert set(exported[0]) == {
        "id", "model", "artifact_type", "prompt", "output", "rating", "correction", "source", "generated_by",
        "created_at", "split", "ingested_at", "rater",
    }  # fmt: skip


def test_export_refuses_other_suffixes_and_overwriting(store: FeedbackStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidFeedbackError, match=r"cannot export to '\.csv'; use one of: \.jsonl, \.parquet"):
        store.export(tmp_path / "out.csv")
    path = tmp_path / "out.parquet"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store.export(path)
    assert path.read_text() == "keep me"
    store.add(row(id="a"))
    assert store.export(path, overwrite=True) == 1
    assert pq.read_table(path)["id"].to_pylist() == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == ["out.parquet"]
