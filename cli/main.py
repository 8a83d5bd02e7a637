"""`incremental ...`: the command line over the library and the `retrain` flow.

Light commands (status, versions, rollback, feedback) import no model code, so they answer in
about a second; `run` and `demo` import the flow.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from incremental.errors import IncrementalError
from incremental.feedback import FeedbackStore
from incremental.registry import Registry
from incremental.reporting import VersionRow, version_table
from incremental.settings import Settings

# Prefect's embedded API migrates a fresh SQLite file on first start, which can take longer than
# its 20 s default on a busy laptop; and nothing here should phone home. Users' own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="Continuous LoRA fine-tuning from user feedback, with a quality gate.", no_args_is_help=True)
feedback_app = typer.Typer(help="Add or import feedback rows.", no_args_is_help=True)
dataset_app = typer.Typer(help="Look at what the next run would train and evaluate on.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
app.add_typer(dataset_app, name="dataset")

# Wide enough for the version table when the output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Model name (default: INCREMENTAL_MODEL).")]


def _context(model: str | None) -> tuple[Settings, str]:
    settings = Settings()
    return settings, model or settings.model


def _store(settings: Settings) -> FeedbackStore:
    store = FeedbackStore(settings.db_path, lock_timeout_s=settings.db_lock_timeout_s)
    store.init()
    return store


@app.callback()
def _main(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide the [INCREMENTAL] log lines.")] = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    # Library chatter below warnings from the HF stack is noise on a terminal.
    for noisy in ("httpx", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def status(model: ModelOption = None) -> None:
    """Mode (Base or Incremental), current version, lineage and pending feedback."""
    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    lineage = registry.lineage(current) if current else []
    if current is None:
        console.print(f"🆕 [bold]Base Mode[/]: no accepted version of [bold]{model}[/]; the next training starts from the base model ({settings.base_model}).")
    else:
        console.print(f"🔄 [bold]Incremental Mode[/]: current version [bold]{current}[/]; the next training builds on it.")
        console.print(f"Lineage: {' ← '.join(lineage)} ← base")
    counts = _store(settings).counts(model, lineage)
    console.print(
        f"Feedback for {model}: {counts.total} rows — [bold]{counts.new} new[/] (not learned by this lineage), "
        f"{counts.learned} learned, {counts.eval} held out for evaluation, {counts.rejected} rejected outputs without correction."
    )


@app.command()
def versions(model: ModelOption = None) -> None:
    """All versions: parent, status, which is current, score changes against the parent."""
    settings, model = _context(model)
    rows = version_table(Registry(settings.models_root, model))
    if not rows:
        console.print(f"No versions of {model} yet. Run `incremental run` after adding feedback.")
        return
    console.print(render_version_table(rows, title=f"Versions of {model}"))


def render_version_table(rows: list[VersionRow], title: str) -> Table:
    table = Table(title=title)
    for column in ("version", "parent", "status", "current", "target NLL", "Δ NLL", "prompt gain", "Δ gain", "created"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            row.parent,
            "[green]accepted[/]" if row.status == "accepted" else "[red]rejected[/]",
            "◀ current" if row.current else "",
            _number(row.target_nll),
            _number(row.nll_delta, signed=True),
            _number(row.prompt_gain),
            _number(row.gain_delta, signed=True),
            row.created,
        )
    return table


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="Version to make current, or 'base' for base mode.")],
    model: ModelOption = None,
    force: Annotated[bool, typer.Option(help="Allow a version the gate rejected.")] = False,
    reason: Annotated[str, typer.Option(help="Why; kept in the history.")] = "",
) -> None:
    """Make an accepted version current again; the next training builds on it."""
    settings, model = _context(model)
    result = Registry(settings.models_root, model).rollback(None if version == "base" else version, force=force, reason=reason)
    console.print(result.message)


@feedback_app.command("add")
def feedback_add(
    artifact_type: Annotated[str, typer.Option("--type", "-t", help="erd | api | prototype")],
    rating: Annotated[str, typer.Option(help="good | needs_improvement")],
    notes: Annotated[Path, typer.Option(help="File with the meeting notes (the prompt).", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option(help="File with the generated artifact.", exists=True, dir_okay=False)],
    correction: Annotated[Optional[Path], typer.Option(help="File with the corrected artifact.", exists=True, dir_okay=False)] = None,
    generated_by: Annotated[Optional[str], typer.Option(help="Version that generated the output.")] = None,
    model: ModelOption = None,
) -> None:
    """Store one rating."""
    settings, model = _context(model)
    row_id = _store(settings).add(
        {
            "model": model,
            "artifact_type": artifact_type,
            "rating": rating,
            "prompt": notes.read_text(encoding="utf-8"),
            "output": output.read_text(encoding="utf-8"),
            "correction": correction.read_text(encoding="utf-8") if correction else None,
            "generated_by": generated_by,
            "source": "cli",
        }
    )
    console.print(f"Stored feedback {row_id} for {model}.")


@feedback_app.command("import")
def feedback_import(
    file: Annotated[Path, typer.Argument(help="JSONL file: one feedback object per line.")],
    model: ModelOption = None,
) -> None:
    """Import a JSONL file in one transaction: every row or none."""
    settings, model = _context(model)
    report = _store(settings).import_file(file, default_model=model)
    console.print(f"Imported {len(report.ids)} rows from {file}.")


@dataset_app.command("preview")
def dataset_preview(
    model: ModelOption = None,
    examples: Annotated[int, typer.Option(help="How many new rows to show.")] = 3,
) -> None:
    """Counts of new, replay and eval rows the next run would use, and a few new rows."""
    from incremental.config import RunConfig
    from incremental.dataset import plan_dataset

    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    lineage = registry.lineage() if registry.current() else []
    collected = _store(settings).collect(model, lineage)
    config = RunConfig()
    plan = plan_dataset(collected.new, collected.learned, collected.eval, collected.rejected, config.data, config.train.seed)
    console.print(
        f"Next run for {model} (builds on {registry.current() or 'base model'}): "
        f"[bold]{len(plan.new_ids)} new[/] + {len(plan.replay_ids)} replayed rows to train on; "
        f"{len(plan.eval_ids)} held-out rows and {len(plan.rejected_ids)} rejected outputs to evaluate on."
    )
    table = Table(title="New rows")
    for column in ("id", "type", "notes", "target"):
        table.add_column(column, overflow="fold")
    for row in collected.new.slice(0, examples).to_pylist():
        table.add_row(row["id"][:8], row["artifact_type"], _clip(row["prompt"]), _clip(row["target"]))
    console.print(table)


@app.command()
def run(
    model: ModelOption = None,
    config: Annotated[Optional[Path], typer.Option(help="JSON file with run config fields (lora, train, data, gate).")] = None,
) -> None:
    """Run the retrain flow once, locally (Prefect's embedded API unless PREFECT_API_URL is set)."""
    from flows.retrain import retrain
    from incremental.config import RunConfig

    run_config = RunConfig.model_validate_json(config.read_text()) if config else RunConfig()
    summary = retrain(model=model, config=run_config)
    console.print(summary.headline())


@app.command()
def serve(
    model: ModelOption = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the nightly schedule (03:30 local).")] = "UTC",
) -> None:
    """Serve the nightly and manual deployments from this process (needs a Prefect server: PREFECT_API_URL)."""
    from deployments.retrain import serve_deployments

    settings, model = _context(model)
    serve_deployments(model, timezone)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's DuckDB file and versions (wiped first).")] = Path("demo-run"),
) -> None:
    """The whole story on the embedded tiny model: v1, v2, a poisoned v3 rejected, rollback, v4."""
    from cli.demo import run_demo

    run_demo(workdir, console)


def main() -> None:
    try:
        app()
    except IncrementalError as error:
        console.print(f"[red]error:[/] {error}")
        raise SystemExit(2) from None


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
