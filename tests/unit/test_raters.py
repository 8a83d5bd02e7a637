"""Who rated each row, on real DuckDB files: the v5 column and its migration, the rater's checks,
every way in and out (add, import, export, rate, HTTP), raters' records and held rows in groups."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

import incremental.feedback.database as database
from incremental.errors import InvalidFeedbackError
from incremental.feedback import FeedbackInput, FeedbackStore, Generation, HeldGroup, RaterRecord, hold_rule
from incremental.http_api import make_server

from conftest import feedback_row, ids_in, write_feedback_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
V1 = "v1_20250101_000000"
V2 = "v2_20250102_000000"
V3 = "v3_20250103_000000"
FORMATS = ("jsonl", "csv", "parquet")


def raters(store: FeedbackStore) -> dict[str, str | None]:
    """Every stored row's rater by id."""
    with duckdb.connect(str(store.path), read_only=True) as con:
        return dict(con.execute("SELECT id, rater FROM feedback").fetchall())


# -- the column and its migration ---------------------------------------------------------------


def test_a_v4_database_migrates_with_its_rows_unrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as v4:
        v4.setattr(database, "_MIGRATIONS", database._MIGRATIONS[:4])
        v4.setattr(database, "SCHEMA_VERSION", 4)
        old = FeedbackStore(tmp_path / "v4.duckdb")
        old.init()
        with duckdb.connect(str(old.path)) as con:  # a v4 row as v4 code wrote it: no rater column
            con.execute(
                "INSERT INTO feedback VALUES ('old', 'tiny', 'erd', 'notes', 'erDiagram', 'good', NULL, 'api', NULL, now(), 'train', now())"
            )
    store = FeedbackStore(tmp_path / "v4.duckdb")
    store.init()
    assert raters(store) == {"old": None}
    store.add(feedback_row(id="new", rater="ana"))
    assert raters(store) == {"old": None, "new": "ana"}
    assert store.collect("tiny", []).new.column("rater").to_pylist() == [None, "ana"]


def test_the_checked_in_v1_database_migrates_with_every_rater_unknown(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    shutil.copy(FIXTURES / "feedback_v1.duckdb", path)
    store = FeedbackStore(path)
    store.init()
    assert set(raters(store).values()) == {None} and len(raters(store)) == 40
    collected = store.collect("tiny", [V2, V1])
    assert collected.new.column_names[-1] == "rater" and set(collected.new.column("rater").to_pylist()) == {None}
    assert list(store.rater_records("tiny")) == [None] and store.rater_records("tiny")[None].rows == 40


# -- the rater's checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rater", "problem"),
    [
        ("", "must not be empty or only whitespace"),
        ("  \u00a0", "must not be empty or only whitespace"),
        ("ana\nbob", "must be one line without control characters"),
        ("ana\tbob", "must be one line without control characters"),
        ("ana\u2028bob", "must be one line without control characters"),
        ("x" * 129, "is longer than 128 characters"),
        ("-", "which the command line reads as 'rater not known'"),
        (7, "must be text, got a number"),
    ],
)
def test_a_bad_rater_is_refused_naming_the_field_and_the_fix(store: FeedbackStore, rater: object, problem: str) -> None:
    with pytest.raises(InvalidFeedbackError, match=r"field 'rater': ") as refused:
        store.add(FeedbackInput(**feedback_row(rater=rater)))  # type: ignore[arg-type]
    assert problem in str(refused.value) and "omit it (or pass null) when it is not known" in str(refused.value)
    assert raters(store) == {}


def test_a_rater_is_stored_without_surrounding_whitespace_and_may_be_long(store: FeedbackStore) -> None:
    spaced = store.add(feedback_row(rater=" \u00a0ana@example.com\t "))
    longest = store.add(feedback_row(rater="é" * 128))
    unknown = store.add(feedback_row())
    assert raters(store) == {spaced: "ana@example.com", longest: "é" * 128, unknown: None}


# -- every way in and out -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
def test_import_reads_a_rater_column_and_export_writes_it_back(store: FeedbackStore, tmp_path: Path, suffix: str) -> None:
    rows = [feedback_row(id="a", rater="ana"), feedback_row(id="b", rater="bob"), feedback_row(id="c")]
    assert store.import_file(write_feedback_file(tmp_path / f"in.{suffix}", rows)).stored == 3
    assert raters(store) == {"a": "ana", "b": "bob", "c": None}

    exported = tmp_path / "out.jsonl"
    assert store.export(exported) == 3
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert list(lines[0])[-1] == "rater" and {line["id"]: line["rater"] for line in lines} == raters(store)
    fresh = FeedbackStore(tmp_path / "fresh.duckdb")
    fresh.init()
    assert fresh.import_file(exported).stored == 3 and raters(fresh) == raters(store)
    assert store.import_file(exported).already_stored == 3  # the same rows again change nothing


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_file_without_a_rater_column_still_imports(store: FeedbackStore, tmp_path: Path, suffix: str) -> None:
    path = write_feedback_file(tmp_path / f"old.{suffix}", [feedback_row(id="x"), feedback_row(id="y", prompt="other")])
    assert store.import_file(path).stored == 2
    assert raters(store) == {"x": None, "y": None}


def test_a_bad_rater_in_a_file_names_its_line(store: FeedbackStore, tmp_path: Path) -> None:
    path = write_feedback_file(tmp_path / "bad.jsonl", [feedback_row(id="a", rater="ana"), feedback_row(id="b", rater="a\nb")])
    with pytest.raises(InvalidFeedbackError, match=rf"{path}:2: field 'rater': must be one line"):
        store.import_file(path)
    assert raters(store) == {}


def test_a_stored_row_given_again_with_another_rater_is_refused(store: FeedbackStore, tmp_path: Path) -> None:
    store.add(feedback_row(id="a", rater="ana"))
    path = write_feedback_file(tmp_path / "again.jsonl", [feedback_row(id="a", rater="bob")])
    with pytest.raises(InvalidFeedbackError, match="already stored with a different rater"):
        store.import_file(path)
    # A file that names no rater is the same row (exports from before raters were recorded import again).
    assert store.import_file(write_feedback_file(tmp_path / "plain.jsonl", [feedback_row(id="a")])).already_stored == 1


def test_content_ids_tell_raters_apart_and_stay_what_they_were_without_one(store: FeedbackStore, tmp_path: Path) -> None:
    same = feedback_row(created_at="2025-01-01T00:00:00Z")
    path = write_feedback_file(tmp_path / "two.jsonl", [{**same, "rater": "ana"}, {**same, "rater": "bob"}, same])
    assert store.import_file(path).stored == 3
    # The id of a row without a rater is the one imports derived before raters were recorded.
    with duckdb.connect() as con:
        (before,) = con.execute(
            "SELECT left(sha256(to_json([?, ?, ?, ?, ?, NULL::VARCHAR, ?])), 32)",
            [same["model"], same["artifact_type"], same["prompt"], same["output"], same["rating"], same["created_at"]],
        ).fetchall()[0]
    assert raters(store)[before] is None and sorted(filter(None, raters(store).values())) == ["ana", "bob"]


def test_rating_a_generation_records_its_rater(store: FeedbackStore) -> None:
    made = Generation(model="tiny", version=V1, artifact_type="erd", notes="Customers order.", output="erDiagram")
    store.record_generation(made)
    with pytest.raises(InvalidFeedbackError, match="field 'rater'"):
        store.rate(made.id, "good", rater="an\na")
    assert raters(store) == {}  # refused: the generation is still unrated
    assert store.rate(made.id, "good", rater="ana") == made.id
    assert raters(store) == {made.id: "ana"}


def _post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_rate_takes_a_rater_and_refuses_a_bad_one_naming_it(store: FeedbackStore) -> None:
    made = [Generation(model="tiny", version=None, artifact_type="api", notes=f"notes {n}", output="openapi: 3.0.0") for n in range(2)]
    for generation in made:
        store.record_generation(generation)
    # The endpoint's rating path needs only the generator's `rate`, which is the store's.
    server = make_server(SimpleNamespace(rate=store.rate), port=0)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/rate"
    try:
        for bad, problem in ((5, "rater: must be a string or null"), ("a\nb", "field 'rater': must be one line")):
            status, answer = _post(url, {"generation_id": made[0].id, "rating": "good", "rater": bad})
            assert status == 400 and problem in answer["error"], answer
        assert raters(store) == {}
        assert _post(url, {"generation_id": made[0].id, "rating": "good", "rater": "ana"})[0] == 200
        assert _post(url, {"generation_id": made[1].id, "rating": "good"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
    assert raters(store) == {made[0].id: "ana", made[1].id: None}


def test_every_table_collect_returns_carries_the_rater(store: FeedbackStore) -> None:
    train, evals = ids_in("train", 3, "t"), ids_in("eval", 1, "e")
    store.add_many([feedback_row(id=row_id, rater=f"r-{row_id}") for row_id in train + evals])
    store.add(feedback_row(id="rejected", rating="needs_improvement", rater="zoe"))
    store.mark("tiny", train[:1], "hold", reason="format: x", actor="screening", version=V2)
    collected = store.collect("tiny", [])
    for table in (collected.new, collected.eval, collected.rejected, collected.held):
        assert table.column_names[-1] == "rater"
        assert table.column("rater").to_pylist() == [f"r-{i}" if i != "rejected" else "zoe" for i in table.column("id").to_pylist()]
    assert store.rows("tiny", train[1:]).column("rater").to_pylist() == [f"r-{i}" for i in train[1:]]


# -- a rater's record ---------------------------------------------------------------------------


def test_rater_records_count_rows_holds_releases_exclusions_and_gate_blame(store: FeedbackStore) -> None:
    ana = [f"ana-{n}" for n in range(6)]
    bob = [f"bob-{n}" for n in range(3)]
    unknown = ["nobody-0", "nobody-1"]
    store.add_many([feedback_row(id=i, prompt=i, rater=i.split("-")[0]) for i in ana + bob])
    store.add_many([feedback_row(id=i, prompt=i) for i in unknown])
    store.mark("tiny", ana[:2], "hold", reason="format: no header", actor="screening", version=V2)
    store.mark("tiny", ana[2:5] + bob[:1] + unknown[:1], "hold", reason=f"batch of rejected {V2}: worse", actor="gate", version=V2)
    store.mark("tiny", ana[2:3] + bob[:1], "release", reason="fine", actor="carla")  # a person
    store.mark("tiny", ana[3:4], "exclude", reason="spam", actor="carla")
    store.mark("tiny", ana[5:6], "exclude", reason="spam", actor="carla")  # never held
    store.mark("tiny", unknown[:1], "release", reason="run failed", actor="rollback")  # not a person

    records = store.rater_records("tiny")
    assert list(records) == ["ana", "bob", None]
    assert records["ana"] == RaterRecord(rater="ana", rows=6, held=3, released=1, excluded=2, blamed_by_gate=3)
    assert records["bob"] == RaterRecord(rater="bob", rows=3, held=0, released=1, excluded=0, blamed_by_gate=1)
    assert records[None] == RaterRecord(rater=None, rows=2, held=0, released=0, excluded=0, blamed_by_gate=1)
    assert (records["ana"].settled, records["ana"].bad_share) == (3, 5 / 6)
    assert RaterRecord(rater="x", rows=0, held=0, released=0, excluded=0, blamed_by_gate=0).bad_share == 0.0
    assert store.rater_records("other") == {}


# -- held rows in groups ------------------------------------------------------------------------


def test_held_rows_group_by_actor_version_rater_and_rule_oldest_first(store: FeedbackStore) -> None:
    store.add_many([feedback_row(id=f"a{n}", prompt=f"notes {n}", rater="ana") for n in range(4)])
    store.add_many([feedback_row(id=f"u{n}", prompt=f"notes u{n}", output="x" * 500) for n in range(2)])
    store.mark("tiny", ["a1", "a0"], "hold", reason="format: no erDiagram line", actor="screening", version=V2)
    store.mark("tiny", ["a2"], "hold", reason="ungrounded: names ORDER", actor="screening", version=V2)
    store.mark("tiny", ["u0", "u1"], "hold", reason=f"batch of rejected {V3}: target_nll worse", actor="gate", version=V3)
    store.mark("tiny", ["a3"], "hold", reason="looks odd", actor="ana")
    store.mark("tiny", ["u1"], "exclude", reason="spam", actor="ana")  # excluded: settled, in no group

    groups = store.held_groups("tiny")
    keys = [(g.actor, g.version, g.rater, g.rule, g.ids) for g in groups]
    assert keys == [
        ("screening", V2, "ana", "format", ("a0", "a1")),
        ("screening", V2, "ana", "ungrounded", ("a2",)),
        ("gate", V3, None, f"batch of rejected {V3}", ("u0",)),
        ("ana", None, "ana", "looks odd", ("a3",)),
    ]
    first = groups[0]
    assert isinstance(first, HeldGroup) and first.count == 2
    assert (first.sample_id, first.sample_type, first.sample_reason, first.sample_notes) == ("a0", "erd", "format: no erDiagram line", "notes 0")
    assert len(groups[2].sample_target) == 200  # only the start of a long target is read
    assert [g.oldest_held_at for g in groups] == sorted(g.oldest_held_at for g in groups)
    assert sum(g.count for g in groups) == store.counts("tiny", []).held == 5
    assert hold_rule("lot: 3 of 8 sampled rows failed: format") == "lot" and hold_rule("checking") == "checking"


def test_held_by_names_the_version_of_the_hold_in_effect(store: FeedbackStore) -> None:
    store.add_many([feedback_row(id="a"), feedback_row(id="b", prompt="b")])
    store.mark("tiny", ["a", "b"], "hold", reason="format: x", actor="screening", version=V2)
    store.mark("tiny", ["a"], "release", reason="fine", actor="ana")
    store.mark("tiny", ["a"], "hold", reason="checking", actor="ana")  # held again, with no version
    assert store.held_by("tiny", V2) == ("b",)
    assert [(g.version, g.ids) for g in store.held_groups("tiny")] == [(V2, ("b",)), (None, ("a",))]
