"""`incremental ...`: the command line over the library and the `retrain` flow.

Light commands (status, versions, rollback, feedback) import no model code, so they answer in
about a second; `run` and `demo` import the flow.

An error a user can fix (bad input, a bad setting or config file, a path that cannot be used) is one
`error:` line and exit code 2, and nothing is stored; anything else is a bug and keeps its traceback.
Everything printed that a user or a file supplied goes through `_safe`: Rich markup in it is text.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import duckdb
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.markdown import Markdown
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from incremental.errors import ConfigurationError, IncrementalError, InvalidFeedbackError
from incremental.feedback import FeedbackStore, HeldGroup
from incremental.feedback.ingest import MAX_FIELD_BYTES, NO_RATER
from incremental.layout import MODEL_NAME
from incremental.registry import Registry
from incremental.reporting import VersionRow, version_table
from incremental.settings import Settings

# Prefect's embedded API migrates a fresh SQLite file on first start, which can take longer than
# its 20 s default on a busy laptop; and nothing here should phone home. Users' own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class CliInputError(IncrementalError, ValueError):
    """A command's arguments are wrong, do not fit together, or name nothing; nothing was changed."""


class _OneLineErrors(TyperGroup):
    """The top command group: an error a user can fix (`_user_error`) becomes one `error:` line and exit
    code 2, under CliRunner as in a terminal; any other exception is re-raised with its traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _flags_without_a_value(self)

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        _flags_without_a_value(self)  # again: typer adds the --*-completion flags after __init__
        return params

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as error:  # sorted by _user_error; what it does not know is re-raised untouched
            message = _user_error(error)
            if message is None:
                raise
            # soft_wrap: a long path or problem list stays whole for grep, whatever the width.
            console.print(f"[red]error:[/] {_safe(message)}", soft_wrap=True)
            raise typer.Exit(2) from None


def _flags_without_a_value(command: typer.core.TyperCommand | TyperGroup) -> None:
    """Help shows a flag (`--json`, `--help`) bare and a value option with a named value (`--limit LIMIT`):
    typer's own help column shows a type for every option (`<bool>`, `<int range>`), as if a flag took one."""
    help_option = command.get_help_option(typer.Context(command))  # made once per command and cached there
    for param in [*command.params, *([help_option] if help_option else [])]:
        if isinstance(param, TyperOption) and param.metavar is None:
            choices = param.type_descriptor.choices if param.type_descriptor.is_choice else None
            param.metavar = "" if param.is_flag else "|".join(map(str, choices)) if choices else param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _flags_without_a_value(sub)


def _user_error(error: Exception) -> str | None:
    """What to tell a user about an error they can fix, or None for a bug. Click's own usage errors (an
    unknown option, a missing value) are not here: typer shows them with the usage line, exit code 2."""
    if isinstance(error, IncrementalError):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return (
            f"{error.filename}: {error.strerror}; check the path and its permissions (the feedback database is "
            "INCREMENTAL_DB_PATH, the version tree INCREMENTAL_MODELS_ROOT)"
        )
    return None


app = typer.Typer(
    cls=_OneLineErrors, help="Continuous LoRA fine-tuning from user feedback, with a quality gate.", no_args_is_help=True
)
feedback_app = typer.Typer(help="Add or import feedback rows.", no_args_is_help=True)
dataset_app = typer.Typer(help="Look at what the next run would train and evaluate on.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
app.add_typer(dataset_app, name="dataset")
gate_app = typer.Typer(help="Inspect and calibrate the quality gate.", no_args_is_help=True)
app.add_typer(gate_app, name="gate")

# Wide enough for the version table when the output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Model name (default: INCREMENTAL_MODEL).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts instead of text and tables.")]


def _settings() -> Settings:
    """The settings from INCREMENTAL_* variables and .env; a bad value names its variable."""
    try:
        settings = Settings()
    except ValidationError as error:
        first = error.errors()[0]
        name = f"INCREMENTAL_{str(first['loc'][0]).upper()}" if first["loc"] else "the INCREMENTAL_* settings"
        more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
        raise ConfigurationError(
            f"{name}={_shown(first.get('input'))}: {first['msg']}{more}; fix it or unset it (environment or .env)"
        ) from None
    if settings.models_root.exists() and not settings.models_root.is_dir():
        raise ConfigurationError(
            f"INCREMENTAL_MODELS_ROOT={settings.models_root}: is a file, not a folder; point it at the folder of version trees"
        )
    return settings


def _context(model: str | None) -> tuple[Settings, str]:
    settings = _settings()
    _check_model_option(model, settings)
    return settings, model or settings.model


def _check_model_option(model: str | None, settings: Settings) -> None:
    if model is not None and not MODEL_NAME.match(model):
        raise CliInputError(
            f"--model {_shown(model)}: not a model name; use 1-64 lowercase letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (e.g. {settings.model!r})"
        )


def _store(settings: Settings) -> FeedbackStore:
    """The feedback store at INCREMENTAL_DB_PATH, created or migrated; a path that cannot be one is one clear line."""
    path = settings.db_path
    store = FeedbackStore(path, lock_timeout_s=settings.db_lock_timeout_s)
    fix = "point INCREMENTAL_DB_PATH at the feedback database, or at a path that does not exist yet to create one"
    try:
        store.init()
    except duckdb.Error as error:
        if path.is_dir():
            raise ConfigurationError(f"feedback database {path}: is a folder, not a DuckDB file; {fix}") from None
        raise ConfigurationError(
            f"feedback database {path}: DuckDB cannot open it ({str(error).splitlines()[0]}); it is empty, not a DuckDB "
            f"file, or written by another DuckDB version; {fix} (the file was not changed)"
        ) from None
    except OSError as error:
        raise ConfigurationError(f"feedback database {path}: cannot create it ({error.strerror}: {error.filename}); {fix}") from None
    return store


@app.callback()
def _main(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide the [INCREMENTAL] log lines.")] = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    # Library chatter below warnings from the HF stack is noise on a terminal.
    for noisy in ("httpx", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def status(model: ModelOption = None, as_json: JsonOption = False) -> None:
    """Mode (Base or Incremental), current version, lineage and pending feedback."""
    settings, model = _context(model)
    store = _store(settings)  # first: a database that cannot be opened is the only line printed
    registry = Registry(settings.models_root, model)
    current = registry.current()
    lineage = registry.lineage(current) if current else []
    if as_json:
        counts = store.counts(model, lineage, trusted_before=_accepted_at(registry, current))
        _print_json(
            {
                "model": model,
                "mode": "incremental" if current else "base",
                "base_model": str(settings.base_model),
                "current": current,
                "next_version_number": registry.next_number(),
                "lineage": lineage,
                "rollback_targets": [*registry.rollback_targets(), *(["base"] if current else [])],
                "problems": registry.verify(current) if current else [],
                "interrupted": registry.interrupted(),
                "feedback": dataclasses.asdict(counts),
                "held": _held_summary(store.held_groups(model)),
            }
        )
        return
    next_number = registry.next_number()
    if current is None:
        console.print(
            f"🆕 [bold]Base Mode[/]: no accepted version of [bold]{_safe(model)}[/]; next training will be "
            f"[bold]v{next_number}[/], from the base model ({_safe(settings.base_model)})."
        )
    else:
        console.print(
            f"🔄 [bold]Incremental Mode[/]: loaded [bold]{_safe(current)}[/]; next training builds on "
            f"[bold]{_safe(current)}[/] (as v{next_number})."
        )
        console.print(f"Lineage: {_safe(' ← '.join(lineage))} ← base")
        problems = registry.verify(current)
        if problems:
            console.print(
                f"[red]⚠ {_safe(current)} is damaged[/]: {_safe('; '.join(problems))}. Serving and runs refuse it; "
                "`incremental doctor` explains, `incremental rollback <version>` moves off it."
            )
    targets = [*registry.rollback_targets(), *(["base"] if current else [])]
    if targets:
        console.print(f"Can roll back to: {_safe(', '.join(targets))} (`incremental rollback VERSION`).")
    for name in registry.interrupted():
        console.print(f"Note: {_safe(name)} was accepted, but its run stopped before it became current (see `incremental doctor`).")
    counts = store.counts(model, lineage, trusted_before=_accepted_at(registry, current))
    console.print(
        f"Feedback for {_safe(model)}: {counts.total} rows — [bold]{counts.new} new[/] (not learned by this lineage), "
        f"{counts.learned} learned, {counts.eval} eval rows ({counts.trusted_eval} trusted), "
        f"{counts.rejected} rejected outputs without correction, "
        f"[bold]{counts.held} held[/] (neither trained nor trusted until released), {counts.excluded} excluded."
    )
    groups = store.held_groups(model)
    if groups:
        # Held rows wait for a person; how long the oldest has waited says whether anyone is looking.
        console.print(
            f"[bold]{sum(group.count for group in groups)} rows held[/], oldest {_ago(min(g.oldest_held_at for g in groups))}; "
            "see `incremental feedback held`: it groups them and prints the command that releases or excludes each group."
        )


def _held_summary(groups: Sequence[HeldGroup]) -> dict[str, Any]:
    """How many rows wait for a person, in how many groups, and since when (`status --json`)."""
    return {
        "rows": sum(group.count for group in groups),
        "groups": len(groups),
        "oldest_held_at": min((group.oldest_held_at for group in groups), default=None),
    }


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
    as_json: JsonOption = False,
) -> None:
    """All versions: parent, status, which is current, score changes against the parent."""
    settings, model = _context(model)
    if as_json:
        registry = Registry(settings.models_root, model)
        _print_json(_verdict_record(registry, explain) if explain is not None else [dataclasses.asdict(row) for row in version_table(registry)])
        return
    if explain is not None:
        # Markdown has no Rich markup: the explanation's text is printed as it is.
        from incremental.reporting import explain_version

        console.print(Markdown(explain_version(Registry(settings.models_root, model), explain)))
        return
    rows = version_table(Registry(settings.models_root, model))
    if not rows:
        console.print(f"No versions of {_safe(model)} yet. Run `incremental run` after adding feedback.")
        return
    console.print(render_version_table(rows, title=f"Versions of {_safe(model)}"))


def _verdict_record(registry: Registry, name: str) -> dict[str, Any]:
    """What `versions --explain` shows, as data: the manifest's data counts, gate verdict, checks and promotion."""
    info = registry.get(name)
    manifest = info.manifest
    data, gate = manifest.data, manifest.gate
    return {
        "name": manifest.name,
        "model": manifest.model,
        "parent": manifest.parent,
        "status": manifest.status,
        "current": info.is_current,
        "created_at": manifest.created_at,
        "finalized_at": manifest.finalized_at,
        "base_model": manifest.base_model.model_dump(),
        "data": {
            "new": len(data.new_ids),
            "replay": len(data.replay_ids),
            "eval": len(data.eval_ids),
            "rejected": len(data.rejected_ids),
            "arrived_with_batch": len(data.arrived_with_batch_ids),
            "screened": len(data.screened_ids),
            "new_by_generating_version": data.new_by_generating_version,
            "dataset_hash": data.dataset_hash,
            "eval_snapshot_hash": data.eval_snapshot_hash,
        },
        "scores": manifest.scores,
        "gate": {
            "verdict": gate.verdict,
            "reasons": list(gate.reasons),
            "checks": list(gate.checks),
            "held": len(gate.held_ids),
            "evaluation": gate.evaluation,
        },
        "promotion": None if manifest.promotion is None else {
            "decision": manifest.promotion.decision, "state": info.promotion_state, "reason": manifest.promotion.reason,
        },
        "problems": registry.verify(name),
    }


def render_version_table(rows: list[VersionRow], title: str) -> Table:
    table = Table(title=title)
    for column in ("version", "parent", "status", "current", "target NLL", "Δ NLL", "prompt gain", "Δ gain", "created"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            _safe(row.name),
            _safe(row.parent),
            "[red]damaged[/]" if row.problem else "[green]accepted[/]" if row.status == "accepted" else "[red]rejected[/]",
            "◀ current" if row.current else "interrupted" if row.promotion == "interrupted" else "",
            _number(row.target_nll),
            _number(row.nll_delta, signed=True),
            _number(row.prompt_gain),
            _number(row.gain_delta, signed=True),
            _safe(row.created),
        )
    return table


@app.command()
def doctor(
    model: ModelOption = None,
    repair: Annotated[bool, typer.Option("--repair", help="Apply the safe fixes (leftovers of dead runs, lost history lines).")] = False,
) -> None:
    """Check the versions, pointer, history and staging of a model against the registry's invariants."""
    settings, model = _context(model)
    from incremental.doctor import diagnose
    from incremental.doctor import repair as apply_repairs

    db_path = settings.db_path if settings.db_path.is_file() else None

    def check():
        return diagnose(settings.models_root, model, db_path, embedded_cache_dir=settings.embedded_cache_dir)

    findings = check()
    if repair:
        for line in apply_repairs(findings):
            console.print(f"[green]repaired[/]: {_safe(line)}")
        findings = check()
    if not findings:
        console.print(f"No problems found in {_safe(str(settings.models_root / model))}.")
        return
    table = Table(title=f"Doctor: {model}")
    for column in ("severity", "what", "fix", "repairable"):
        table.add_column(column)
    colour = {"error": "red", "warning": "yellow", "info": "dim"}
    for finding in findings:
        table.add_row(
            f"[{colour[finding.severity]}]{finding.severity}[/]", _safe(finding.what), _safe(finding.fix),
            "yes (--repair)" if finding.repairable else "no",
        )  # fmt: skip
    console.print(table)
    if any(finding.severity == "error" for finding in findings):
        raise typer.Exit(1)


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="Version to make current, or 'base' for base mode.")],
    model: ModelOption = None,
    force: Annotated[bool, typer.Option("--force", help="Allow a version the gate rejected.")] = False,
    reason: Annotated[str, typer.Option(help="Why; kept in the history.")] = "",
) -> None:
    """Make an accepted version current again; the next training builds on it."""
    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    result = registry.rollback(None if version == "base" else version, force=force, reason=reason)
    console.print(_safe(result.message))
    # The learned record follows the new lineage now, not at the next run: rows only abandoned
    # versions learned are new again in `status` and `dataset preview` at once.
    current = registry.current()
    if settings.db_path.is_file():
        _store(settings).sync_learned(model, registry.lineage(current) if current else [])


RaterOption = Annotated[
    Optional[str],
    typer.Option(
        "--rater",
        help=f"Who rated it (default: INCREMENTAL_RATER, else your login name; {NO_RATER!r}: not known).",
    ),
]


def _rater(option: str | None, settings: Settings) -> tuple[str | None, str]:
    """Who rates, and where that came from (for an error message): --rater, else INCREMENTAL_RATER,
    else the login name. None (the row's rater is not known) for `--rater -` or a system without one."""
    if option is not None:
        return (None if option == NO_RATER else option), "--rater"
    if settings.rater is not None:
        return settings.rater, "INCREMENTAL_RATER"
    try:
        return getpass.getuser(), "the login name"
    except (KeyError, OSError):  # no LOGNAME/USER and no passwd entry (some containers): not known
        return None, "nobody"


@contextmanager
def _rater_named(source: str) -> Iterator[None]:
    """The store names a bad rater's field; a rater the user did not type also gets where it came from."""
    try:
        yield
    except InvalidFeedbackError as error:
        if source == "--rater" or "field 'rater'" not in str(error):
            raise
        raise CliInputError(f"{source} is not a rater the store takes: {error}; fix it, or pass --rater NAME") from None


def _rated_by(rater: str | None) -> str:
    return f", rated by {_safe(rater)}" if rater is not None else " (rater not known)"


@feedback_app.command("add")
def feedback_add(
    artifact_type: Annotated[str, typer.Option("--type", "-t", help="erd | api | prototype")],
    rating: Annotated[str, typer.Option(help="good | needs_improvement")],
    notes: Annotated[Path, typer.Option(help="File with the meeting notes (the prompt).", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option(help="File with the generated artifact.", exists=True, dir_okay=False)],
    correction: Annotated[Optional[Path], typer.Option(help="File with the corrected artifact.", exists=True, dir_okay=False)] = None,
    generated_by: Annotated[Optional[str], typer.Option(help="Version that generated the output.")] = None,
    rater: RaterOption = None,
    model: ModelOption = None,
) -> None:
    """Store one rating."""
    settings, model = _context(model)
    rater, rater_source = _rater(rater, settings)
    row = {
        "model": model,
        "artifact_type": artifact_type,
        "rating": rating,
        "prompt": _read_field("--notes", notes),
        "output": _read_field("--output", output),
        "correction": _read_field("--correction", correction) if correction else None,
        "generated_by": generated_by,
        "source": "cli",
        "rater": rater,
    }
    with _rater_named(rater_source):
        row_id = _store(settings).add(row)
    console.print(f"Stored feedback {_safe(row_id)} for {_safe(model)}{_rated_by(rater)}.")


def _read_field(option: str, path: Path) -> str:
    """A file's text for one field: UTF-8 and at most MAX_FIELD_BYTES (checked before it is read)."""
    try:
        size = path.stat().st_size
        if size > MAX_FIELD_BYTES:
            raise CliInputError(
                f"{option} {path}: {size} bytes, over the limit of {MAX_FIELD_BYTES // (1024 * 1024)} MiB per text field; "
                "shorten it"
            )
        data = path.read_bytes()
    except OSError as error:
        raise CliInputError(f"{option} {path}: cannot read it ({error.strerror}); check the path and its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CliInputError(
            f"{option} {path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save the file as UTF-8"
        ) from None


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
    A text field holds at most 16 MiB of UTF-8; a created_at more than a day ahead of this machine's clock is refused.
    """
    settings, model = _context(model)
    report = _store(settings).import_file(file, default_model=model, skip_invalid=skip_invalid)
    console.print(
        f"Imported {report.stored} rows from {_safe(str(file))}"
        + (f"; {report.already_stored} were already stored (skipped)" if report.already_stored else "")
        + (f"; {report.blank_lines} blank lines skipped" if report.blank_lines else "")
        + "."
    )
    if report.rejected:
        console.print(
            f"[yellow]{report.rejected} invalid rows were not stored[/]; they and their problems are in "
            f"{_safe(str(report.rejected_path))}."
        )


@feedback_app.command("export")
def feedback_export(
    file: Annotated[Path, typer.Argument(help="Output .parquet or .jsonl file.")],
    model: Annotated[Optional[str], typer.Option(help="Only this model's rows (default: every model's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace FILE if it exists.")] = False,
) -> None:
    """Write every feedback row, with all its columns, to Parquet or JSONL; `feedback import` reads it back."""
    settings = _settings()
    _check_model_option(model, settings)
    try:
        written = _store(settings).export(file, model=model, overwrite=overwrite)
    except IncrementalError:  # already says what to do (an existing file is also an OSError)
        raise
    except ValueError as error:  # the library's refusal of a bad --model names it
        raise CliInputError(str(error)) from None
    except OSError as error:
        raise CliInputError(f"{file}: cannot write it ({error.strerror}: {error.filename}); choose a path in a folder you can write") from None
    except duckdb.IOException as error:  # DuckDB writes the file itself, so an unwritable path is its error
        raise CliInputError(f"{file}: cannot write it ({str(error).splitlines()[0]}); choose a path in a folder you can write") from None
    console.print(f"Exported {written} rows{f' of {_safe(model)}' if model else ''} to {_safe(str(file))}.")


IdsOption = Annotated[Optional[str], typer.Option("--ids", help="Comma-separated feedback ids.")]
VersionOption = Annotated[Optional[str], typer.Option("--version", help="The rows held with this version's batch or screening.")]
PickRaterOption = Annotated[
    Optional[str], typer.Option("--rater", help=f"Only held rows this rater rated ({NO_RATER!r}: rows whose rater is not known).")
]
RuleOption = Annotated[
    Optional[str], typer.Option("--rule", help="Only held rows whose hold reason starts with this rule (e.g. format).")
]
ByOption = Annotated[str, typer.Option("--by", help="Who decides; kept with the row.")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; kept with the row.")]


def _pick_rows(
    store: FeedbackStore, model: str, ids: str | None, version: str | None, rater: str | None = None, rule: str | None = None
) -> list[str]:
    """The rows a release or exclusion is for: `--ids`, or the held rows that --version, --rater and
    --rule pick together (a group of `incremental feedback held`, or several)."""
    if ids is not None:
        if version is not None or rater is not None or rule is not None:
            raise CliInputError("--ids names the rows itself; give it alone, or pick held rows with --version, --rater and --rule")
        picked = [row_id.strip() for row_id in ids.split(",") if row_id.strip()]
        if not picked:
            raise CliInputError("--ids is empty; give comma-separated feedback ids")
        return picked
    if version is None and rater is None and rule is None:
        raise CliInputError(
            f"give --ids a,b,c, or pick held rows with --version vN_YYYYMMDD_HHMMSS, --rater NAME ({NO_RATER!r}: not known) "
            "and --rule RULE; `incremental feedback held` prints the command for each group"
        )
    if rater is None and rule is None:
        picked = list(store.held_by(model, version))
    else:
        wanted_rater = None if rater == NO_RATER else rater
        picked = sorted(
            row_id
            for group in store.held_groups(model)
            if (version is None or group.version == version)
            and (rater is None or group.rater == wanted_rater)
            and (rule is None or group.rule == rule)
            for row_id in group.ids
        )
    if not picked:
        given = " ".join(
            f"{option} {shlex.quote(value)}" for option, value in (("--version", version), ("--rater", rater), ("--rule", rule)) if value is not None
        )
        raise CliInputError(f"{given}: no held rows match; `incremental feedback held` lists held rows and the command for each group")
    return picked


def _mark(
    action: str, past: str, model: str | None, ids: str | None, version: str | None, by: str, reason: str,
    rater: str | None = None, rule: str | None = None,
) -> None:  # fmt: skip
    settings, model = _context(model)
    store = _store(settings)
    picked = _pick_rows(store, model, ids, version, rater, rule)
    try:
        changed = store.mark(model, picked, action, reason=reason, actor=by, version=version)
    except ValueError as error:  # the store's refusals of these arguments name the option (--reason, --by)
        raise CliInputError(str(error)) from None
    console.print(f"{past.capitalize()} {changed} of {len(picked)} rows of {_safe(model)} ({len(picked) - changed} already were).")


@feedback_app.command("release")
def feedback_release(
    ids: IdsOption = None, version: VersionOption = None, rater: PickRaterOption = None, rule: RuleOption = None,
    model: ModelOption = None, by: ByOption = os.environ.get("USER", "cli"), reason: ReasonOption = "reviewed and released",
) -> None:
    """Release held rows: the next runs train on them (train rows) or score them (eval rows) again.

    Pick them by --ids, or held rows by --version, --rater and --rule together.

    `--version V --rater ana`: the rows held with V's batch or screening that ana rated; `--rater -`: not known.
    """
    _mark("release", "released", model, ids, version, by, reason, rater, rule)


@feedback_app.command("exclude")
def feedback_exclude(
    ids: IdsOption = None, version: VersionOption = None, rater: PickRaterOption = None, rule: RuleOption = None,
    model: ModelOption = None, by: ByOption = os.environ.get("USER", "cli"), reason: ReasonOption = "bad feedback",
) -> None:
    """Exclude rows for good (never trained or trusted); reversible with `include`, nothing is deleted.

    Pick them by --ids, or held rows by --version, --rater and --rule together (as `release` does).
    """
    _mark("exclude", "excluded", model, ids, version, by, reason, rater, rule)


@feedback_app.command("include")
def feedback_include(
    ids: Annotated[str, typer.Option("--ids", help="Comma-separated feedback ids.")], model: ModelOption = None,
    by: ByOption = os.environ.get("USER", "cli"), reason: ReasonOption = "exclusion undone",
) -> None:
    """Undo an exclusion."""
    _mark("include", "included", model, ids, None, by, reason)


@feedback_app.command("held")
def feedback_held(
    model: ModelOption = None,
    limit: Annotated[int, typer.Option(help="Groups to show (--json lists every group).", min=0)] = 20,
    as_json: JsonOption = False,
) -> None:
    """Rows held until a person releases or excludes them, in groups: who held them, with which version,
    whose rows they are and by which rule; with a sample row and the commands that decide each group."""
    model_option = model
    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    store = _store(settings)
    excluded = store.counts(model, registry.lineage(current) if current else []).excluded
    groups = store.held_groups(model)
    commands = [{action: _group_command(action, group, groups, model_option) for action in ("release", "exclude")} for group in groups]
    if as_json:
        _print_json(
            {
                "model": model, "held": sum(group.count for group in groups), "excluded": excluded,
                "oldest_held_at": min((group.oldest_held_at for group in groups), default=None),
                "groups": [
                    {
                        "actor": group.actor, "version": group.version, "rater": group.rater, "rule": group.rule,
                        "count": group.count, "oldest_held_at": group.oldest_held_at, "ids": list(group.ids),
                        "sample": {
                            "id": group.sample_id, "artifact_type": group.sample_type, "reason": group.sample_reason,
                            "notes": group.sample_notes, "target": group.sample_target,
                        },
                        "release_command": command["release"], "exclude_command": command["exclude"],
                    }
                    for group, command in zip(groups, commands)
                ],
            }
        )  # fmt: skip
        return
    held = sum(group.count for group in groups)
    oldest = f"; the oldest was held {_ago(min(g.oldest_held_at for g in groups))}" if groups else ""
    console.print(f"{held} held rows of {_safe(model)} in {len(groups)} groups, {excluded} excluded{oldest}.")
    for group, command in zip(groups[:limit], commands):
        whose = f"rated by {_safe(group.rater)}" if group.rater is not None else "rater not known"
        version = f"with {_safe(group.version)}" if group.version is not None else "without a version"
        console.print(
            f"\n[bold]{group.count} held by {_safe(group.actor)}[/] {version}, {whose}, rule [bold]{_safe(group.rule)}[/]; "
            f"oldest held {_ago(group.oldest_held_at)}",
            soft_wrap=True,
        )
        console.print(
            f"  e.g. {_safe(group.sample_id)} ({_safe(group.sample_type)}): {_safe(_clip(group.sample_reason, 100))}", soft_wrap=True
        )
        console.print(f"    notes:  {_safe(_clip(group.sample_notes, 100))}", soft_wrap=True, highlight=False)
        console.print(f"    target: {_safe(_clip(group.sample_target, 100))}", soft_wrap=True, highlight=False)
        for action in ("release", "exclude"):
            console.print(f"  {action}: {_safe(command[action])}", soft_wrap=True, highlight=False)
    if len(groups) > limit:
        console.print(f"\n... and {len(groups) - limit} more groups (--limit {len(groups)} shows them all).")


def _group_command(action: str, group: HeldGroup, groups: Sequence[HeldGroup], model_option: str | None) -> str:
    """The command that releases or excludes exactly `group`: by its version and rater, with its rule
    when the version and rater alone would pick other groups too, else by its ids."""
    words = ["incremental", "feedback", action, *(["--model", model_option] if model_option else [])]
    if group.version is not None:
        for with_rule in (False, True):
            matching = [
                other for other in groups
                if (other.version, other.rater) == (group.version, group.rater) and (not with_rule or other.rule == group.rule)
            ]  # fmt: skip
            if matching == [group]:
                rule = ["--rule", group.rule] if with_rule else []
                return shlex.join([*words, "--version", group.version, "--rater", group.rater or NO_RATER, *rule])
    return shlex.join([*words, "--ids", ",".join(group.ids)])


def _ago(at: datetime, now: datetime | None = None) -> str:
    """How long ago `at` was, in the largest whole unit: '3 days ago', 'under a minute ago'."""
    seconds = max(((now or datetime.now(UTC)) - at).total_seconds(), 0.0)
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "under a minute ago"


@dataset_app.command("preview")
def dataset_preview(
    model: ModelOption = None,
    examples: Annotated[int, typer.Option(help="How many new rows to show.", min=0)] = 3,
    as_json: JsonOption = False,
) -> None:
    """Counts of new, replay and eval rows the next run would use, and a few new rows."""
    from incremental.config import RunConfig

    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    collected, plan = _next_run_data(settings, model, registry, current, RunConfig())
    if as_json:
        _print_json(_preview_record(model, current, collected, plan, examples))
        return
    n_trusted = sum(collected.eval.column("trusted").to_pylist())
    console.print(
        f"Next run for {_safe(model)} (builds on {_safe(current or 'base model')}): "
        f"[bold]{len(plan.new_ids)} new[/] + {len(plan.replay_ids)} replayed rows to train on (screening may hold some); "
        f"{len(plan.eval_ids)} eval rows ({n_trusted} trusted, judged; {len(plan.eval_ids) - n_trusted} arrived since "
        f"{_safe(current or 'the start')}, reported only) and {len(plan.rejected_ids)} rejected outputs to evaluate on "
        f"(a window of {collected.available.get('eval', 0)} eval and {collected.available.get('rejected', 0)} rejected rows); "
        f"{collected.held.num_rows} held and {collected.n_excluded} excluded rows left out."
    )
    table = Table(title="New rows")
    for column in ("id", "type", "notes", "target"):
        table.add_column(column, overflow="fold")
    for row in collected.new.slice(0, examples).to_pylist():
        table.add_row(_safe(row["id"][:8]), _safe(row["artifact_type"]), _safe(_clip(row["prompt"])), _safe(_clip(row["target"])))
    console.print(table)


def _preview_record(model: str, current: str | None, collected, plan, examples: int) -> dict[str, Any]:
    """What `dataset preview` shows, as data: the counts (in all and per artifact type) and the sample's ids."""
    from incremental.dataset import GOLDEN_SLICE

    by_type: dict[str, dict[str, int]] = {}

    def count(artifact_type: str, bucket: str) -> None:
        buckets = by_type.setdefault(artifact_type, dict.fromkeys(_PREVIEW_BUCKETS, 0))
        buckets[bucket] += 1

    train, evaluation = plan.train.to_pydict(), plan.eval.to_pydict()
    for artifact_type, role in zip(train["artifact_type"], train["role"]):
        count(artifact_type, role)  # new | replay
    for artifact_type, kind, trusted, slice_ in zip(evaluation["artifact_type"], evaluation["kind"], evaluation["trusted"], evaluation["slice"]):
        if slice_ == GOLDEN_SLICE:
            count(artifact_type, "golden")
        elif kind == "rejected":
            count(artifact_type, "rejected")
        else:
            count(artifact_type, "eval_trusted" if trusted else "eval_new")
    for artifact_type in collected.held.column("artifact_type").to_pylist():
        count(artifact_type, "held")
    totals = {bucket: sum(counts[bucket] for counts in by_type.values()) for bucket in _PREVIEW_BUCKETS}
    return {
        "model": model,
        "builds_on": current,
        "counts": {**totals, "eval": totals["eval_trusted"] + totals["eval_new"], "excluded": collected.n_excluded},
        "available": {"eval": collected.available.get("eval", 0), "rejected": collected.available.get("rejected", 0)},
        "by_artifact_type": dict(sorted(by_type.items())),
        "sample_ids": collected.new.column("id").to_pylist()[:examples],
    }


# The buckets of `dataset preview --json` per artifact type; `excluded` rows are counted, not fetched, so
# they have no type. new/replay train; eval_trusted judges; eval_new (arrived since the parent) is reported only.
_PREVIEW_BUCKETS = ("new", "replay", "eval_trusted", "eval_new", "rejected", "golden", "held")


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
        f"{_safe(version)}: {plan.train.num_rows} train rows ({len(data.new_ids)} new + {len(data.replay_ids)} replay), "
        f"{plan.eval.num_rows} eval rows. Train snapshot hash: {'[green]matches[/]' if train_ok else '[red]differs[/]'} "
        f"the manifest; eval snapshot hash: {'[green]matches[/]' if eval_ok else '[red]differs[/]'}."
    )
    if not eval_ok:
        console.print("The eval snapshot includes the golden file (INCREMENTAL_GOLDEN_PATH): it must be the one that run used.")
    if out is not None:
        plan.write(out)
        console.print(f"Wrote {_safe(str(out / 'train.parquet'))} and {_safe(str(out / 'eval.parquet'))}.")
    if not (train_ok and eval_ok):
        raise typer.Exit(1)


@gate_app.command("calibrate")
def gate_calibrate(
    model: ModelOption = None,
    config: Annotated[Optional[Path], typer.Option(metavar="FILE", help="JSON run config whose gate policy to calibrate (default: the defaults).")] = None,
) -> None:
    """Score the current version against itself (two bootstrap seeds, two greedy samples): the gate's noise floor."""
    run_config = _read_config(config)  # before the model stack is imported: a bad file answers at once
    import pyarrow.parquet as pq

    from incremental.calibration import calibrate, flip_risks
    from incremental.layout import SCORES
    from incremental.modeling import Hardware, load_scoring_model, resolve_base
    from incremental.threads import apply_threads

    settings, model = _context(model)
    registry = Registry(settings.models_root, model)
    current = registry.current()
    if current is None:
        raise CliInputError(f"{model} is in base mode: calibrate needs a current version to score against itself")
    apply_threads(settings)
    _, plan = _next_run_data(settings, model, registry, current, run_config)
    hardware = Hardware.from_settings(settings)
    scorer, tokenizer = load_scoring_model(resolve_base(settings), hardware, {"current": registry.adapter_dir(current)})
    scores_path = registry.root / current / SCORES
    report = calibrate(
        scorer, tokenizer, plan.eval, run_config.gate, version=current, max_length=run_config.train.max_length,
        prompt_layout=registry.get(current).manifest.prompt_layout,
        promotion_scores=pq.read_table(scores_path) if scores_path.is_file() else None,
    )
    table = Table(title=f"Noise floor of the gate for the next candidate of {_safe(current)} ({_safe(report.slice)} rows)")
    for column in ("metric", "n", "value", "interval seed A", "interval seed B", "sample B", "± at its promotion", "noise floor", "margin", "margin vs noise"):
        table.add_column(column)
    for noise in report.metrics:
        table.add_row(
            _safe(noise.metric), str(noise.n), f"{noise.value:.4f}",
            escape(f"[{noise.interval_a[0]:.4f}, {noise.interval_a[1]:.4f}]"), escape(f"[{noise.interval_b[0]:.4f}, {noise.interval_b[1]:.4f}]"),
            "—" if noise.sample_b is None else f"{noise.sample_b:.4f}",
            "—" if noise.resolution is None else f"{noise.resolution:.4f}", f"{noise.floor:.4f}", f"{noise.margin:.4f}",
            ("ok" if noise.margin_ok else "[red]margin below the noise floor: verdicts may flip[/]") + ("" if noise.gated else " (not gated)"),
        )  # fmt: skip
    console.print(table)
    risks = flip_risks(report, list(registry.get(current).manifest.gate.checks))
    console.print(f"Verdict of {_safe(current)} that could flip at this noise: " + ("none" if not risks else ""))
    for risk in risks:
        console.print(f"  • {_safe(risk)}")


# How to fix a config problem, by pydantic's error type.
_CONFIG_FIXES = {
    "json_invalid": "write one JSON object of run config fields (lora, train, data, gate)",
    "extra_forbidden": "remove it or fix its spelling",
    "missing": "add it",
}


def _read_config(path: Path | None):
    """The run config from a JSON file, or the defaults; a bad file is one clear line naming the field."""
    from incremental.config import RunConfig

    if path is None:
        return RunConfig()
    try:
        return RunConfig.model_validate_json(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ConfigurationError(f"--config {path}: cannot read it ({error.strerror}); check the path") from None
    except UnicodeDecodeError as error:
        raise ConfigurationError(f"--config {path}: not UTF-8 text (byte offset {error.start}); save the file as UTF-8") from None
    except ValidationError as error:
        first = error.errors()[0]
        fix = _CONFIG_FIXES.get(first["type"], "fix the value, or remove the field to use its default")
        more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
        if not first["loc"]:
            raise ConfigurationError(f"--config {path}: {first['msg']}; {fix}{more}") from None
        where = ".".join(str(part) for part in first["loc"])
        got = "" if first["type"] in ("missing", "extra_forbidden") else f" (got {_shown(first.get('input'))})"
        raise ConfigurationError(f"--config {path}: field '{where}': {first['msg']}{got}; {fix}{more}") from None


@app.command()
def run(
    ctx: typer.Context,
    model: ModelOption = None,
    config: Annotated[Optional[Path], typer.Option(metavar="FILE", help="JSON file with run config fields (lora, train, data, gate).")] = None,
    on_busy: Annotated[
        Literal["wait", "skip"], typer.Option(help="When another run of this model holds its retrain slot: wait for it, or end Skipped.")
    ] = "wait",
    busy_timeout: Annotated[
        Optional[float], typer.Option(metavar="MINUTES", min=0, help="How long to wait for the slot before ending Skipped (default: the flow's, 6 h).")
    ] = None,
) -> None:
    """Run the retrain flow once, locally (a temporary Prefect API unless PREFECT_API_URL is set)."""
    # Checked before the flow is imported: a bad --model, setting or config file answers at once.
    _context(model)
    run_config = _read_config(config)
    from flows.retrain import retrain

    waiting = {} if busy_timeout is None else {"busy_timeout_minutes": busy_timeout}
    with _local_runs(quiet=bool(ctx.find_root().params.get("quiet"))):
        state = retrain(model=model, config=run_config, on_busy=on_busy, **waiting, return_state=True)
    summary = state.result()  # a failed run raises its error here: one `error:` line if a user can fix it
    console.print(_safe(summary.headline()))
    console.print(f"Final state: {_safe(state.name or state.type.value)}")


@contextmanager
def _local_runs(quiet: bool) -> Iterator[None]:
    """The block runs the retrain flow in this process (`run`, `demo`). Its runs report to PREFECT_API_URL,
    or to a temporary server that stops with this process, even when it is killed. The terminal gets the
    runs' `[INCREMENTAL]` lines and the command's own output, not the machinery's: Prefect's bookkeeping
    lines (`_PrefectChatter`) and the bars of every weight loading. (Training keeps the Trainer's raw log
    dicts off stdout itself: incremental/training.py.)"""
    from prefect.logging.handlers import APILogWorker
    from transformers.utils import logging as hf_logging

    import flows.retrain  # noqa: F401  importing the flow sets up Prefect's logging: its console handlers exist from here on
    from cli.prefect_api import prefect_api

    chatter = _PrefectChatter(quiet)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(chatter)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with prefect_api():
            yield
            APILogWorker.drain_all(timeout=5)  # the runs' last log lines reach the API before a temporary one stops
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for handler in handlers:
            handler.removeFilter(chatter)


class _PrefectChatter(logging.Filter):
    """Keeps Prefect's bookkeeping lines about each run and task (beginning, `Finished in state ...`,
    `View at ...`) off the terminal of `incremental run` and `demo`; the Prefect API still gets them.
    Warnings and errors always pass; with --quiet, so does nothing else from Prefect's run loggers."""

    _BOOKKEEPING = re.compile(r"(Beginning (flow|subflow) run|Created (flow|subflow|task) run|Finished in state|View at) ")

    def __init__(self, quiet: bool) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not record.name.startswith("prefect"):
            return True
        if self.quiet and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return False
        return not self._BOOKKEEPING.match(record.getMessage())


@app.command()
def runs(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only this model's runs (default: every model's).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many runs to show, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent runs of the retrain flow on the Prefect server (PREFECT_API_URL): state, model, deployment, timing."""
    settings = _settings()
    _check_model_option(model, settings)
    import httpx
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigurationError(
            "PREFECT_API_URL is not set: the runs are kept by a Prefect server; start one with `prefect server start` and "
            "set PREFECT_API_URL=http://127.0.0.1:4200/api (a plain `incremental run` uses a temporary server that keeps none)"
        )
    found = []
    try:
        with get_client(sync_client=True) as client:
            # The model is a run parameter, which the API cannot filter on: pages are read until `limit` runs match.
            page, offset = max(limit, 100), 0
            while len(found) < limit:
                batch = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])), sort=FlowRunSort.START_TIME_DESC,
                    limit=page, offset=offset,
                )  # fmt: skip
                found += [flow_run for flow_run in batch if model is None or _run_model(flow_run, settings) == model]
                if len(batch) < page:
                    break
                offset += page
            found = found[:limit]
            deployment_ids = list({flow_run.deployment_id for flow_run in found if flow_run.deployment_id})
            deployments = client.read_deployments(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids))) if deployment_ids else []
    except httpx.HTTPError as error:
        raise ConfigurationError(
            f"PREFECT_API_URL={url}: cannot read the runs ({type(error).__name__}: {error}); start the server with "
            "`prefect server start`, or point PREFECT_API_URL at a running one"
        ) from None
    names = {deployment.id: deployment.name for deployment in deployments}
    rows = [
        {
            "id": str(flow_run.id),
            "name": flow_run.name,
            "state": flow_run.state_name,
            "state_type": flow_run.state_type.value if flow_run.state_type else None,
            "model": _run_model(flow_run, settings),
            "deployment": names.get(flow_run.deployment_id, str(flow_run.deployment_id)) if flow_run.deployment_id else None,
            "start_time": flow_run.start_time,
            "duration_seconds": round(flow_run.estimated_run_time.total_seconds(), 1),
            "message": flow_run.state.message if flow_run.state else None,
        }
        for flow_run in found
    ]
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print(f"No runs of the retrain flow{f' for {_safe(model)}' if model else ''} on {_safe(url)} yet.")
        return
    table = Table(title=f"Retrain runs on {_safe(url)}, newest first")
    for column in ("run", "state", "model", "deployment", "started", "duration", "message"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            _safe(row["name"]), _safe(row["state"] or "—"), _safe(row["model"]), _safe(row["deployment"] or "—"),
            row["start_time"].strftime("%Y-%m-%d %H:%M:%S") if row["start_time"] else "—",
            _duration(timedelta(seconds=row["duration_seconds"])), _safe(_clip(row["message"] or "", 80)),
        )  # fmt: skip
    console.print(table)


def _run_model(flow_run, settings: Settings) -> str:
    """The model a retrain run was for: its `model` parameter, or (None) the default model of these settings."""
    return (flow_run.parameters or {}).get("model") or settings.model


def _duration(elapsed: timedelta) -> str:
    seconds = int(elapsed.total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@app.command()
def serve(
    model: ModelOption = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the nightly schedule (03:30 local), e.g. Europe/Berlin.")] = "UTC",
    watch_every: Annotated[
        float, typer.Option(metavar="MINUTES", min=0, help="How often the watcher counts new feedback and starts a retrain when enough is new; 0: no watcher.")
    ] = 15,
) -> None:
    """Serve the nightly and manual deployments (and the feedback watcher) from this process (needs a Prefect server: PREFECT_API_URL)."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    model = _context(model)[1]
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise CliInputError(f"--timezone {_shown(timezone)}: not a time zone; use an IANA name such as 'Europe/Berlin' or 'UTC'") from None
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # A temporary server would take the deployments and never fire a schedule.
        raise ConfigurationError(
            "serve needs a Prefect server: start one with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (see README, Operate it)"
        )
    from deployments.retrain import serve_deployments

    serve_deployments(model, timezone, timedelta(minutes=watch_every) if watch_every else None)


@app.command()
def demo(
    ctx: typer.Context,
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's DuckDB file and versions (wiped first).")] = Path("demo-run"),
    seed: Annotated[int, typer.Option(help="Shifts every day's synthetic feedback; 0 is the README's story.")] = 0,
) -> None:
    """The whole story on the embedded tiny model: v1, v2, a poisoned v3 rejected and held, rollback, v4,
    and what each accepted version generates on fresh meeting notes."""
    from cli.demo import run_demo

    with _local_runs(quiet=bool(ctx.find_root().params.get("quiet"))):
        run_demo(workdir, console, seed=seed)


# Commands kept in their own modules (each imports its heavy code inside the command).
from cli import export as _export_commands  # noqa: E402
from cli import report as _report_commands  # noqa: E402
from cli import serving as _serving_commands  # noqa: E402

_export_commands.register(app)
_report_commands.register(app)
_serving_commands.register(app)


def main() -> None:
    """The `incremental` entry point: exit code 0, 1 for a failed check (rebuild), 2 for a user error."""
    app()


def _print_json(document: object) -> None:
    """One JSON document on stdout and nothing else (log lines go to stderr). ASCII only: no text a user
    supplied can act on a terminal, and every tool reads it back as it was."""
    typer.echo(json.dumps(document, indent=2, default=_json_value))


def _json_value(value: object) -> object:
    return value.isoformat() if isinstance(value, (datetime, date)) else str(value)


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# Characters a terminal acts on instead of showing: C0/C1 controls other than newline (ESC starts escape
# sequences that can rewrite the screen or the window title; a tab would print as spaces) and the bidi
# overrides and isolates (they reorder what follows). Other Unicode, RTL scripts and emoji included, is
# printed as it is.
_HIDDEN = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _safe(text: str) -> str:
    """Text a user or a file supplied, ready for console.print: markup escaped, terminal controls shown
    as Python escapes (\\x1b)."""
    return escape(_HIDDEN.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text))


def _shown(value: object) -> str:
    """A value in an error message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
