"""Recorded generations and ratings by generation id: the feedback row carries the generation's notes,
output and generating version; a second rating, an unknown id or a bad rating is refused and stores nothing."""

from __future__ import annotations

import pyarrow as pa
import pytest

from incremental.errors import IncrementalError
from incremental.feedback import AlreadyRatedError, FeedbackStore, Generation, UnknownGenerationError
from incremental.feedback.lineage import CollectedFeedback

V1 = "v1_20261125_140000"


def generation(**overrides) -> Generation:
    values = dict(
        model="tiny", version=V1, artifact_type="erd", notes="Customers place orders.",
        output="erDiagram\n  CUSTOMER ||--o{ ORDER : places", decoding={"max_new_tokens": 64, "do_sample": False},
    )  # fmt: skip
    return Generation(**{**values, **overrides})


def feedback_rows(store: FeedbackStore) -> list[dict]:
    with store._read() as con:
        table = con.sql("SELECT * FROM feedback ORDER BY id").to_arrow_table()
    return table.to_pylist()


def test_a_recorded_generation_reads_back_whole(store: FeedbackStore):
    made = generation()
    store.record_generation(made)
    assert store.generation(made.id) == made
    assert store.recent_generations("tiny") == [made]
    assert store.recent_generations("other") == []


def test_rating_a_generation_stores_its_notes_output_and_version(store: FeedbackStore):
    made = generation()
    store.record_generation(made)
    feedback_id = store.rate(made.id, "needs_improvement", correction="erDiagram\n  CUSTOMER ||--o{ ORDER : places\n  ORDER")
    [row] = feedback_rows(store)
    assert feedback_id == made.id == row["id"]
    assert (row["model"], row["artifact_type"], row["prompt"], row["output"]) == ("tiny", "erd", made.notes, made.output)
    assert (row["rating"], row["source"], row["generated_by"]) == ("needs_improvement", "rate", V1)
    assert row["correction"].endswith("ORDER")


def test_a_base_mode_generation_is_rated_without_a_version(store: FeedbackStore):
    made = generation(version=None)
    store.record_generation(made)
    store.rate(made.id, "good")
    assert feedback_rows(store)[0]["generated_by"] is None


def test_a_second_rating_is_refused_and_the_first_stays(store: FeedbackStore):
    made = generation()
    store.record_generation(made)
    store.rate(made.id, "good")
    with pytest.raises(AlreadyRatedError, match=rf"already rated 'good'.*feedback exclude --ids {made.id}"):
        store.rate(made.id, "needs_improvement")
    assert [row["rating"] for row in feedback_rows(store)] == ["good"]


def test_an_unknown_id_names_where_ids_come_from(store: FeedbackStore):
    with pytest.raises(UnknownGenerationError, match="'nope' is not recorded.*incremental generate"):
        store.rate("nope", "good")
    assert isinstance(UnknownGenerationError("x"), IncrementalError)


@pytest.mark.parametrize(
    ("rating", "correction", "problem"),
    [("great", None, "rating 'great': use one of good, needs_improvement"), ("good", "fixed", "goes with rating 'needs_improvement'")],
)
def test_a_bad_rating_stores_nothing(store: FeedbackStore, rating, correction, problem):
    made = generation()
    store.record_generation(made)
    with pytest.raises(ValueError, match=problem):
        store.rate(made.id, rating, correction=correction)
    assert feedback_rows(store) == []


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [("version", "latest", "not a version name"), ("artifact_type", "uml", "use one of erd, api, prototype"), ("model", "A B", "not a model name")],
)
def test_a_generation_with_a_bad_field_is_refused(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        generation(**{field: value})


def test_new_rows_are_counted_by_generating_version():
    new = pa.table({"id": ["a", "b", "c", "d"], "generated_by": [V1, None, V1, "v2_20261126_030000"]})
    empty = pa.table({"id": pa.array([], pa.string())})
    collected = CollectedFeedback(model="tiny", lineage=(), new=new, learned=empty, eval=empty, rejected=empty, held=empty)
    assert collected.new_by_generating_version() == {V1: 2, "unrecorded": 1, "v2_20261126_030000": 1}
