"""Reporting tasks: explain the run in the Prefect UI with keyed artifacts, one history per model and kind.

Keys: `retrain-<model>` holds verdicts only (accepted and rejected runs), so its latest entry is the
last real decision; skips go to `skipped-<model>`; `versions-<model>` is the version table;
`dataset-<model>` what each run trained and judged on.
"""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from incremental.registry import Registry
from incremental.reporting import RunSummary, version_table, version_table_markdown
from incremental.settings import Settings


def artifact_key(prefix: str, model: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]', '-', model)}"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(settings: Settings, summary: RunSummary) -> None:
    """The run's outcome under its kind's key, and (after a verdict) the version table."""
    kind = "skipped" if summary.status == "skipped" else "retrain"
    create_markdown_artifact(summary.to_markdown(), key=artifact_key(kind, summary.model), description=summary.headline())
    if summary.status == "skipped":
        return
    rows = version_table(Registry(settings.models_root, summary.model))
    create_markdown_artifact(
        version_table_markdown(rows), key=artifact_key("versions", summary.model),
        description=f"Versions of {summary.model}, newest first",
    )  # fmt: skip


@task(name="publish-dataset-summary", cache_policy=NO_CACHE)
def publish_dataset_summary(model: str, version: str, rows: list[dict[str, object]]) -> None:
    """New, replay, eval (trusted / with the batch), rejected, held and screened rows per artifact type."""
    create_table_artifact(rows, key=artifact_key("dataset", model), description=f"Data of {version}: rows per artifact type")
