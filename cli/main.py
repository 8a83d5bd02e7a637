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
from rich.markup import escape
from rich.markdown import Markdown
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
gate_app = typer.Typer(help="Inspect and calibrate the quality gate.", no_args_is_help=True)
app.add_typer(gate_app, name="gate")

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
    counts = _store(settings).counts(model, lineage, trusted_before=_accepted_at(registry, current))
    console.print(
        f"Feedback for {model}: {counts.total} rows — [bold]{counts.new} new[/] (not learned by this lineage), "
        f"{counts.learned} learned, {counts.eval} eval rows ({counts.trusted_eval} trusted), "
        f"{counts.rejected} rejected outputs without correction, "
        f"[bold]{counts.held} held[/] (neither trained nor trusted until released), {counts.excluded} excluded."
    )
    if counts.held:
        console.print("See them with `incremental feedback held`; `incremental feedback release` or `exclude` decides.")


def _next_run_data(settings: Settings, model: str, registry: Registry, current: str | None, config):
    """What the next run would collect (with the config's eval window) and plan, without training."""
    from functools import partial

    from incremental.dataset import plan_dataset, read_golden
    from incremental.feedback import EvalWindow

    store = _store(settings)
    window = EvalWindow(per_type=config.data.max_eval_rows_per_type, anchors=config.data.eval_anchor_rows)
    lineage = registry.lineage(current) if current else []
    collected = store.collect(model, lineage, trusted_before=_accepted_at(registry, current), window=window)
    golden = read_golden(settings.golden_path) if settings.golden_path else None
    plan = plan_dataset(collected, config.data, seed=config.train.seed, fetch_rows=partial(store.rows, model), golden=golden)
    return collected, plan


def _accepted_at(registry: Registry, version: str | None):
    """When `version` was accepted: eval rows that arrived by then are trusted for judging its children."""
    return None if version is None else registry.get(version).manifest.finalized_at


@app.command()
def versions(
    model: ModelOption = None,
    explain: Annotated[Optional[str], typer.Option(help="Explain one version's gate verdict: data, per-metric intervals, reasons.")] = None,
) -> None:
    """All versions: parent, status, which is current, score changes against the parent."""
    settings, model = _context(model)
    if explain is not None:
        from incremental.reporting import explain_version

        console.print(Markdown(explain_version(Registry(settings.models_root, model), explain)))
        return
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
    registry = Registry(settings.models_root, model)
    result = registry.rollback(None if version == "base" else version, force=force, reason=reason)
    console.print(result.message)
    # The learned record follows the new lineage now, not at the next run: rows only abandoned
    # versions learned are new again in `status` and `dataset preview` at once.
    current = registry.current()
    if settings.db_path.is_file():
        _store(settings).sync_learned(model, registry.lineage(current) if current else [])


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
    file: Annotated[Path, typer.Argument(help="JSONL (.jsonl, .ndjson), CSV (with a header line) or Parquet file of feedback rows.")],
    model: ModelOption = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Store the valid rows and write the invalid ones to FILE.rejected.jsonl beside it.")
    ] = False,
) -> None:
    """Import a file in one transaction: every row or none (or, with --skip-invalid, every valid row).

    Importing the same file again stores nothing new: rows already stored with the same content are skipped.
    """
    settings, model = _context(model)
    report = _store(settings).import_file(file, default_model=model, skip_invalid=skip_invalid)
    console.print(
        f"Imported {report.stored} rows from {escape(str(file))}"
        + (f"; {report.already_stored} were already stored (skipped)" if report.already_stored else "")
        + (f"; {report.blank_lines} blank lines skipped" if report.blank_lines else "")
        + "."
    )
    if report.rejected:
        console.print(
            f"[yellow]{report.rejected} invalid rows were not stored[/]; they and their problems are in "
            f"{escape(str(report.rejected_path))}."
        )


@feedback_app.command("export")
def feedback_export(
    file: Annotated[Path, typer.Argument(help="Output .parquet or .jsonl file.")],
    model: Annotated[Optional[str], typer.Option(help="Only this model's rows (default: every model's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace FILE if it exists.")] = False,
) -> None:
    """Write every feedback row, with all its columns, to Parquet or JSONL; `feedback import` reads it back."""
    settings = Settings()
    written = _store(settings).export(file, model=model, overwrite=overwrite)
    console.print(f"Exported {written} rows{f' of {model}' if model else ''} to {escape(str(file))}.")


IdsOption = Annotated[Optional[str], typer.Option("--ids", help="Comma-separated feedback ids.")]
VersionOption = Annotated[Optional[str], typer.Option("--version", help="The rows held with this version's batch or screening.")]
ByOption = Annotated[str, typer.Option("--by", help="Who decides; kept with the row.")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; kept with the row.")]


def _pick_rows(store: FeedbackStore, model: str, ids: str | None, version: str | None) -> list[str]:
    if (ids is None) == (version is None):
        raise typer.BadParameter("give exactly one of --ids a,b,c or --version vN_YYYYMMDD_HHMMSS")
    if ids is not None:
        picked = [row_id.strip() for row_id in ids.split(",") if row_id.strip()]
        if not picked:
            raise typer.BadParameter("--ids is empty; give comma-separated feedback ids")
        return picked
    picked = list(store.held_by(model, version))
    if not picked:
        raise typer.BadParameter(f"no rows are held with {version}; `incremental feedback held` lists held rows")
    return picked


def _mark(action: str, past: str, model: str | None, ids: str | None, version: str | None, by: str, reason: str) -> None:
    settings, model = _context(model)
    store = _store(settings)
    picked = _pick_rows(store, model, ids, version)
    changed = store.mark(model, picked, action, reason=reason, actor=by, version=version)
    console.print(f"{past.capitalize()} {changed} of {len(picked)} rows of {model} ({len(picked) - changed} already were).")


@feedback_app.command("release")
def feedback_release(
    ids: IdsOption = None, version: VersionOption = None, model: ModelOption = None,
    by: ByOption = os.environ.get("USER", "cli"), reason: ReasonOption = "reviewed and released",
) -> None:
    """Release held rows: the next runs train on them (train rows) or score them (eval rows) again."""
    _mark("release", "released", model, ids, version, by, reason)


@feedback_app.command("exclude")
def feedback_exclude(
    ids: IdsOption = None, version: VersionOption = None, model: ModelOption = None,
    by: ByOption = os.environ.get("USER", "cli"), reason: ReasonOption = "bad feedback",
) -> None:
    """Exclude rows for good (never trained or trusted); reversible with `include`, nothing is deleted."""
    _mark("exclude", "excluded", model, ids, version, by, reason)


@feedback_app.command("include")
def feedback_include(
    ids: Annotated[str, typer.Option("--ids", help="Comma-separated feedback ids.")], model: ModelOption = None,
    by: ByOption = os.environ.get("USER", "cli"), reason: ReasonOption = "exclusion undone",
) -> None:
    """Undo an exclusion."""
    _mark("include", "included", model, ids, None, by, reason)


@feedback_app.command("held")
def feedback_held(model: ModelOption = None, limit: Annotated[int, typer.Option(help="Rows to show.")] = 20) -> None:
    """Rows held until a person releases or excludes them, with who held them and why."""
    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    collected = _store(settings).collect(model, registry.lineage(current) if current else [])
    held = collected.held
    console.print(f"{held.num_rows} held rows of {model}, {collected.n_excluded} excluded.")
    if not held.num_rows:
        return
    table = Table(title="Held rows")
    for column in ("id", "type", "rating", "split", "reason"):
        table.add_column(column, overflow="fold")
    for row in held.slice(0, limit).to_pylist():
        table.add_row(escape(row["id"]), row["artifact_type"], row["rating"], row["split"], escape(_clip(row["hold_reason"] or "", 100)))
    console.print(table)


@dataset_app.command("preview")
def dataset_preview(
    model: ModelOption = None,
    examples: Annotated[int, typer.Option(help="How many new rows to show.")] = 3,
) -> None:
    """Counts of new, replay and eval rows the next run would use, and a few new rows."""
    from incremental.config import RunConfig

    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    collected, plan = _next_run_data(settings, model, registry, current, RunConfig())
    n_trusted = sum(collected.eval.column("trusted").to_pylist())
    console.print(
        f"Next run for {model} (builds on {current or 'base model'}): "
        f"[bold]{len(plan.new_ids)} new[/] + {len(plan.replay_ids)} replayed rows to train on (screening may hold some); "
        f"{len(plan.eval_ids)} eval rows ({n_trusted} trusted, judged; {len(plan.eval_ids) - n_trusted} arrived since "
        f"{current or 'the start'}, reported only) and {len(plan.rejected_ids)} rejected outputs to evaluate on "
        f"(a window of {collected.available.get('eval', 0)} eval and {collected.available.get('rejected', 0)} rejected rows); "
        f"{collected.held.num_rows} held and {collected.n_excluded} excluded rows left out."
    )
    table = Table(title="New rows")
    for column in ("id", "type", "notes", "target"):
        table.add_column(column, overflow="fold")
    for row in collected.new.slice(0, examples).to_pylist():
        table.add_row(row["id"][:8], row["artifact_type"], _clip(row["prompt"]), _clip(row["target"]))
    console.print(table)


@dataset_app.command("rebuild")
def dataset_rebuild(
    version: Annotated[str, typer.Argument(help="The version whose training and eval snapshot to rebuild.")],
    model: ModelOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder to write train.parquet and eval.parquet into.")] = None,
) -> None:
    """Rebuild a version's train and eval snapshot from its manifest and the stored rows; check both hashes."""
    from functools import partial

    from incremental.dataset import content_hash, EVAL_COLUMNS, rebuild_plan, read_golden

    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    manifest = registry.get(version).manifest
    data = manifest.data
    golden = read_golden(settings.golden_path) if settings.golden_path else None
    plan = rebuild_plan(
        new_ids=data.new_ids, replay_ids=data.replay_ids, eval_ids=data.eval_ids, rejected_ids=data.rejected_ids,
        fetch_rows=partial(_store(settings).rows, model), trusted_before=_accepted_at(registry, manifest.parent), golden=golden,
    )  # fmt: skip
    train_ok = content_hash(plan.train) == data.dataset_hash
    eval_ok = content_hash(plan.eval, EVAL_COLUMNS) == data.eval_snapshot_hash
    console.print(
        f"{version}: {plan.train.num_rows} train rows ({len(data.new_ids)} new + {len(data.replay_ids)} replay), "
        f"{plan.eval.num_rows} eval rows. Train snapshot hash: {'[green]matches[/]' if train_ok else '[red]differs[/]'} "
        f"the manifest; eval snapshot hash: {'[green]matches[/]' if eval_ok else '[red]differs[/]'}."
    )
    if not eval_ok:
        console.print("The eval snapshot includes the golden file (INCREMENTAL_GOLDEN_PATH): it must be the one that run used.")
    if out is not None:
        plan.write(out)
        console.print(f"Wrote {escape(str(out / 'train.parquet'))} and {escape(str(out / 'eval.parquet'))}.")
    if not (train_ok and eval_ok):
        raise typer.Exit(1)


@gate_app.command("calibrate")
def gate_calibrate(
    model: ModelOption = None,
    config: Annotated[Optional[Path], typer.Option(help="JSON run config whose gate policy to calibrate (default: the defaults).")] = None,
) -> None:
    """Score the current version against itself (two bootstrap seeds, two greedy samples): the gate's noise floor."""
    import pyarrow.parquet as pq

    from incremental.calibration import calibrate, flip_risks
    from incremental.layout import SCORES
    from incremental.modeling import Hardware, load_scoring_model, resolve_base

    settings, model = _context(model)
    run_config = _read_config(config)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    if current is None:
        raise typer.BadParameter(f"{model} is in base mode: calibrate needs a current version to score against itself")
    _, plan = _next_run_data(settings, model, registry, current, run_config)
    hardware = Hardware.from_settings(settings)
    scorer, tokenizer = load_scoring_model(resolve_base(settings), hardware, {"current": registry.adapter_dir(current)})
    scores_path = registry.root / current / SCORES
    report = calibrate(
        scorer, tokenizer, plan.eval, run_config.gate, version=current, max_length=run_config.train.max_length,
        promotion_scores=pq.read_table(scores_path) if scores_path.is_file() else None,
    )
    table = Table(title=f"Noise floor of the gate for the next candidate of {current} ({report.slice} rows)")
    for column in ("metric", "n", "value", "interval seed A", "interval seed B", "sample B", "± at its promotion", "noise floor", "margin", "margin vs noise"):
        table.add_column(column)
    for noise in report.metrics:
        table.add_row(
            noise.metric, str(noise.n), f"{noise.value:.4f}",
            f"[{noise.interval_a[0]:.4f}, {noise.interval_a[1]:.4f}]", f"[{noise.interval_b[0]:.4f}, {noise.interval_b[1]:.4f}]",
            "—" if noise.sample_b is None else f"{noise.sample_b:.4f}",
            "—" if noise.resolution is None else f"{noise.resolution:.4f}", f"{noise.floor:.4f}", f"{noise.margin:.4f}",
            ("ok" if noise.margin_ok else "[red]margin below the noise floor: verdicts may flip[/]") + ("" if noise.gated else " (not gated)"),
        )  # fmt: skip
    console.print(table)
    risks = flip_risks(report, list(registry.get(current).manifest.gate.checks))
    console.print(f"Verdict of {current} that could flip at this noise: " + ("none" if not risks else ""))
    for risk in risks:
        console.print(f"  • {escape(risk)}")


def _read_config(path: Path | None):
    """The run config from a JSON file, or the defaults; a bad file is one clear line, not a traceback."""
    from pydantic import ValidationError

    from incremental.config import RunConfig

    if path is None:
        return RunConfig()
    try:
        return RunConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise typer.BadParameter(f"--config {path}: {error.strerror}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(file)"
        raise typer.BadParameter(f"--config {path}: field '{where}': {first['msg']} ({error.error_count()} problem(s))") from None


@app.command()
def run(
    model: ModelOption = None,
    config: Annotated[Optional[Path], typer.Option(help="JSON file with run config fields (lora, train, data, gate).")] = None,
) -> None:
    """Run the retrain flow once, locally (Prefect's embedded API unless PREFECT_API_URL is set)."""
    from flows.retrain import retrain

    summary = retrain(model=model, config=_read_config(config))
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
    seed: Annotated[int, typer.Option(help="Shifts every day's synthetic feedback; 0 is the README's story.")] = 0,
) -> None:
    """The whole story on the embedded tiny model: v1, v2, a poisoned v3 rejected and held, rollback, v4."""
    from cli.demo import run_demo

    run_demo(workdir, console, seed=seed)


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
