"""Feedback-store tasks: read what the lineage has not learned, hold rows, record what a version trained on."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.config import DataSettings
from incremental.dataset import DatasetSnapshot
from incremental.feedback import CollectedFeedback, EvalWindow, FeedbackStore
from incremental.settings import Settings


def open_store(settings: Settings) -> FeedbackStore:
    return FeedbackStore(settings.db_path, lock_timeout_s=settings.db_lock_timeout_s)


# No task retries: the store already retries a locked file for INCREMENTAL_DB_LOCK_TIMEOUT_S, and a
# run that cannot read its snapshot should fail at once, before anything trains, naming the file.
@task(name="collect-feedback", cache_policy=NO_CACHE)
def collect_feedback(
    settings: Settings, model: str, lineage: tuple[str, ...], trusted_before: datetime | None, data: DataSettings
) -> CollectedFeedback:
    """The run's snapshot of the feedback, taken once at its start: rows written later are new next time."""
    store = open_store(settings)
    store.init()
    window = EvalWindow(per_type=data.max_eval_rows_per_type, anchors=data.eval_anchor_rows)
    return store.collect(model, lineage, trusted_before=trusted_before, window=window)


@task(name="hold-rows", cache_policy=NO_CACHE)
def hold_rows(settings: Settings, model: str, reasons: Mapping[str, str], *, actor: str, version: str) -> int:
    """Hold rows with their reasons (one mark per distinct reason); a person releases or excludes them."""
    store = open_store(settings)
    by_reason: dict[str, list[str]] = {}
    for row_id, reason in reasons.items():
        by_reason.setdefault(reason, []).append(row_id)
    return sum(store.mark(model, ids, "hold", reason=reason, actor=actor, version=version) for reason, ids in by_reason.items())


@task(name="record-consumption", cache_policy=NO_CACHE)
def record_consumption(settings: Settings, model: str, version: str, snapshot: DatasetSnapshot) -> None:
    """Written before the version folder appears: a version never exists without its record."""
    open_store(settings).record_consumption(model, version, new_ids=snapshot.new_ids, replay_ids=snapshot.replay_ids)


@task(name="advance-learned-record", cache_policy=NO_CACHE)
def advance_learned_record(settings: Settings, model: str, lineage: tuple[str, ...]) -> str:
    """After a promotion: add the new version's trained rows to the learned record (O(new)). Idempotent;
    if it never runs, the next collect brings the record up to date itself."""
    return open_store(settings).sync_learned(model, lineage)
