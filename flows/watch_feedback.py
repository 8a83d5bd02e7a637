"""Retrain on data, not only on the clock: count a model's new feedback and, when there is enough and
no retrain of that model is running or due, start its manual deployment.

A cheap sensor meant to run every few minutes (`incremental serve` serves it as `watch-<model>`): one
read-only count in DuckDB (the same buckets `incremental status` shows) and one query to the Prefect
API. It does not train and does not hold the model's slot; a retrain it starts while another one
slips in just waits for the slot and then skips, so a race costs a short run, never a second training.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from pydantic import Field

from incremental.config import ModelName
from incremental.feedback import FeedbackStore
from incremental.registry import Registry
from incremental.settings import Settings

# A retrain due this soon (a nightly run, a run someone queued) will collect the same rows itself.
DUE_WITHIN = timedelta(minutes=15)
_ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


def new_rows(settings: Settings, model: str) -> int:
    """Rows of `model` its current lineage has not learned yet (the `new` of `incremental status`)."""
    registry = Registry(settings.models_root, model)
    parent = registry.parent()
    store = FeedbackStore(settings.db_path, lock_timeout_s=settings.db_lock_timeout_s)
    return store.counts(model, parent.lineage, trusted_before=parent.accepted_at).new


def active_retrains(model: str, default_model: str) -> list[str]:
    """Names and states of the retrain runs of `model` that are running, starting, or due within DUE_WITHIN.

    Any retrain run counts (either deployment, a CLI run reporting to this server, another host);
    a run without a model parameter retrains the default model.
    """
    due_by = datetime.now(timezone.utc) + DUE_WITHIN
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE)),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=due_by),
            ),
        )
    return [
        f"{run.name} ({run.state.name if run.state else 'no state'})"
        for run in runs
        if (run.parameters.get("model") or default_model) == model
    ]


@flow(name="watch-feedback", description="Start retrain/manual-<model> when the model has enough new feedback.")
def watch_feedback(
    model: ModelName,
    min_new_rows: Annotated[int, Field(ge=1, description="New rows that start a retrain.")] = 50,
) -> str | None:
    """Start `retrain/manual-<model>` if at least `min_new_rows` rows are new and no retrain of it is
    running or due; returns the started run's id, or None with a log line saying why not."""
    logger = get_run_logger()
    settings = Settings()
    if not settings.db_path.exists():
        logger.info("[INCREMENTAL] No retrain of %s: no feedback database at %s yet", model, settings.db_path)
        return None
    count = new_rows(settings, model)
    if count < min_new_rows:
        logger.info("[INCREMENTAL] No retrain of %s: %d new rows, waiting for %d", model, count, min_new_rows)
        return None
    active = active_retrains(model, settings.model)
    if active:
        logger.info(
            "[INCREMENTAL] No retrain of %s started: %d new rows, but a retrain of it is running or due: %s",
            model, count, ", ".join(active),
        )  # fmt: skip
        return None
    started = run_deployment(f"retrain/manual-{model}", timeout=0, as_subflow=False, tags=["watch-feedback"])
    logger.info("[INCREMENTAL] Started retrain of %s (%s): %d new rows >= %d", model, started.name, count, min_new_rows)
    return str(started.id)
