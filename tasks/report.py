"""Reporting task: explain the run in the Prefect UI (Markdown summary and the version table)."""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from incremental.registry import Registry
from incremental.reporting import RunSummary, version_table, version_table_markdown
from incremental.settings import Settings


def artifact_key(prefix: str, model: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]', '-', model)}"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(settings: Settings, summary: RunSummary) -> None:
    """Keyed artifacts, so the Artifacts page keeps one versioned history per model."""
    create_markdown_artifact(
        summary.to_markdown(), key=artifact_key("retrain", summary.model), description=summary.headline()
    )
    rows = version_table(Registry(settings.models_root, summary.model))
    create_markdown_artifact(
        version_table_markdown(rows), key=artifact_key("versions", summary.model), description="All versions"
    )
