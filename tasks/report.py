"""Reporting tasks: explain the run in the Prefect UI with keyed artifacts, one history per model and kind.

Keys: `retrain-<model>` holds verdicts only (accepted and rejected runs), so its latest entry is the
last real decision; skips go to `skipped-<model>`; `versions-<model>` is the version table;
`dataset-<model>` what each run trained and judged on; `history-<model>` the whole history (lineage
tree, chart, data, verdicts, held and excluded rows), whose page and chart are also written to
`reports/<model>/` beside the feedback database (`incremental report` writes the same files).
"""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from incremental.feedback import FeedbackStore
from incremental.history_report import default_report_dir, gather_history, history_markdown, write_report
from incremental.registry import Registry
from incremental.reporting import RunSummary, version_table, version_table_markdown
from incremental.settings import Settings


def artifact_key(prefix: str, model: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]', '-', model)}"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(settings: Settings, summary: RunSummary) -> None:
    """The run's outcome under its kind's key, and (after a verdict) the version table and the history report."""
    kind = "skipped" if summary.status == "skipped" else "retrain"
    create_markdown_artifact(summary.to_markdown(), key=artifact_key(kind, summary.model), description=summary.headline())
    if summary.status == "skipped":
        return
    rows = version_table(Registry(settings.models_root, summary.model))
    create_markdown_artifact(
        version_table_markdown(rows), key=artifact_key("versions", summary.model),
        description=f"Versions of {summary.model}, newest first",
    )  # fmt: skip
    publish_history(settings, summary.model)


def publish_history(settings: Settings, model: str) -> None:
    """Write the history page and chart, and attach them to the run: the chart inline (the UI shows a
    data-URL image), the tree, data and verdicts as Markdown, and where the files are."""
    store = FeedbackStore(settings.db_path, lock_timeout_s=settings.db_lock_timeout_s) if settings.db_path.is_file() else None
    history = gather_history(Registry(settings.models_root, model), store)
    files = write_report(history, default_report_dir(settings.db_path, model))
    create_markdown_artifact(
        history_markdown(history, files, files.png.read_bytes()), key=artifact_key("history", model),
        description=f"History of {model}: lineage, verdicts, data per version, held and excluded rows ({files.html})",
    )  # fmt: skip


@task(name="publish-dataset-summary", cache_policy=NO_CACHE)
def publish_dataset_summary(model: str, version: str, rows: list[dict[str, object]], recipe: str | None = None) -> None:
    """New, replay, eval (trusted / with the batch), rejected, held and screened rows per artifact type, and the
    training recipe the run fitted to the batch (`FittedRecipe.description`)."""
    described = f"Data of {version}: rows per artifact type" + (f". Recipe: {recipe}" if recipe else "")
    create_table_artifact(rows, key=artifact_key("dataset", model), description=described)
