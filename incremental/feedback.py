"""The feedback store: rated outputs, which rows each version consumed, and run records, in DuckDB.

Answers "which rows has the current lineage not learned yet?" from the consumption table alone (no
timestamp watermarks). Opens the file briefly for each call and never holds it, so serving and other
runs can get at it. Knows nothing about versions beyond their names: the caller passes the lineage
(read from the version tree, DESIGN invariant 8), and knows nothing about tokenizers or training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from incremental.errors import ConfigurationError, IncrementalError, InvalidFeedbackError
from incremental.layout import MODEL_NAME, VERSION_NAME
from incremental.prompting import ARTIFACT_TYPES

__all__ = [
    "IMPORT_FORMATS",
    "SCHEMA_VERSION",
    "CollectedFeedback",
    "FeedbackCounts",
    "FeedbackInput",
    "FeedbackSchemaError",
    "FeedbackStore",
    "FeedbackStoreLockedError",
    "ImportReport",
    "MARK_ACTIONS",
    "RowMark",
    "RunRecord",
    "split_for",
]

logger = logging.getLogger(__name__)

RunStatus = Literal["running", "skipped", "accepted", "rejected", "failed"]
RUN_STATUSES: tuple[str, ...] = ("running", "skipped", "accepted", "rejected", "failed")
IMPORT_FORMATS: tuple[str, ...] = (".jsonl",)

# Each entry migrates the schema from version i to i + 1; SCHEMA_VERSION is how many there are.
# Append new steps; never edit a released one (databases in the field already ran it).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE feedback (
            id            VARCHAR PRIMARY KEY,
            model         VARCHAR NOT NULL,
            artifact_type VARCHAR NOT NULL CHECK (artifact_type IN ('erd', 'api', 'prototype')),
            prompt        VARCHAR NOT NULL,
            output        VARCHAR NOT NULL,
            rating        VARCHAR NOT NULL CHECK (rating IN ('good', 'needs_improvement')),
            correction    VARCHAR,
            source        VARCHAR NOT NULL,
            generated_by  VARCHAR,
            created_at    TIMESTAMPTZ NOT NULL,
            split         VARCHAR NOT NULL CHECK (split IN ('train', 'eval')),
            ingested_at   TIMESTAMPTZ NOT NULL,
            CHECK (correction IS NULL OR rating = 'needs_improvement')
        )
        """,
        """
        CREATE TABLE version_rows (
            model       VARCHAR NOT NULL,
            version     VARCHAR NOT NULL,
            feedback_id VARCHAR NOT NULL,
            role        VARCHAR NOT NULL CHECK (role IN ('new', 'replay', 'eval', 'rejected')),
            PRIMARY KEY (model, version, feedback_id)
        )
        """,
        """
        CREATE TABLE runs (
            run_id      VARCHAR PRIMARY KEY,
            model       VARCHAR NOT NULL,
            version     VARCHAR,
            parent      VARCHAR,
            status      VARCHAR NOT NULL
                        CHECK (status IN ('running', 'skipped', 'accepted', 'rejected', 'failed')),
            reason      VARCHAR NOT NULL,
            started_at  TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ,
            details     JSON
        )
        """,
    ),
    (
        # v2: holds and exclusions as an append-only log (the latest mark per row and kind wins),
        # and the parent-score cache, so a gate's cost grows with the rows it has not scored.
        "CREATE SEQUENCE row_marks_seq START 1",
        """
        CREATE TABLE row_marks (
            seq         BIGINT PRIMARY KEY DEFAULT nextval('row_marks_seq'),
            model       VARCHAR NOT NULL,
            feedback_id VARCHAR NOT NULL,
            action      VARCHAR NOT NULL CHECK (action IN ('hold', 'release', 'exclude', 'include')),
            reason      VARCHAR NOT NULL,
            actor       VARCHAR NOT NULL,
            version     VARCHAR,
            marked_at   TIMESTAMPTZ NOT NULL
        )
        """,
        """
        CREATE TABLE score_cache (
            model        VARCHAR NOT NULL,
            version      VARCHAR NOT NULL,
            scorer       VARCHAR NOT NULL,
            example_hash VARCHAR NOT NULL,
            nll_sum      DOUBLE,
            n_tokens     BIGINT,
            text         VARCHAR,
            scored_at    TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (model, version, scorer, example_hash)
        )
        """,
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
MARK_ACTIONS: tuple[str, ...] = ("hold", "release", "exclude", "include")

_FEEDBACK_COLUMNS = (
    "id", "model", "artifact_type", "prompt", "output", "rating", "correction",
    "source", "generated_by", "created_at", "split", "ingested_at",
)  # fmt: skip
_STORED_AS_GIVEN = tuple(name for name in _FEEDBACK_COLUMNS if name not in ("split", "ingested_at"))
_UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")
_INCOMING_SCHEMA = pa.schema(
    [(name, _UTC_TIMESTAMP if name in ("created_at", "ingested_at") else pa.string()) for name in _FEEDBACK_COLUMNS]
)

# Every row of a model lands in exactly one bucket. Trainable = 'good' (target = output) or
# 'needs_improvement' with a correction (target = correction). An excluded row is out for good
# (until included again), a held one until a person releases it: neither is trained or trusted.
# The lineage is a list parameter unnested in SQL, so the cost is one scan of the model's rows,
# its lineage's consumption rows and its marks. `trusted` marks eval and rejected-output rows that
# arrived before the parent was accepted ($trusted_before; NULL in base mode: nothing is trusted).
_CLASSIFIED_SQL = """
WITH lineage AS (SELECT unnest($lineage::VARCHAR[]) AS version),
consumed AS (
    SELECT DISTINCT feedback_id AS id
    FROM version_rows
    WHERE model = $model AND role IN ('new', 'replay') AND version IN (SELECT version FROM lineage)
),
marks AS (
    SELECT feedback_id AS id,
           arg_max(action, seq) FILTER (WHERE action IN ('hold', 'release')) AS hold_state,
           arg_max(reason, seq) FILTER (WHERE action IN ('hold', 'release')) AS hold_reason,
           arg_max(action, seq) FILTER (WHERE action IN ('exclude', 'include')) AS exclude_state
    FROM row_marks WHERE model = $model GROUP BY feedback_id
),
classified AS (
    SELECT
        f.id, f.artifact_type, f.prompt, f.output, f.correction,
        CASE WHEN f.correction IS NOT NULL THEN f.correction ELSE f.output END AS target,
        f.rating, f.source, f.generated_by, f.created_at, f.ingested_at, f.split,
        coalesce(f.ingested_at <= $trusted_before::TIMESTAMPTZ, false) AS trusted,
        m.hold_reason,
        CASE
            WHEN m.exclude_state = 'exclude' THEN 'excluded'
            WHEN m.hold_state = 'hold' THEN 'held'
            WHEN f.rating = 'needs_improvement' AND f.correction IS NULL THEN 'rejected'
            WHEN f.split = 'eval' THEN 'eval'
            WHEN c.id IS NULL THEN 'new'
            ELSE 'learned'
        END AS bucket
    FROM feedback AS f
    LEFT JOIN consumed AS c ON c.id = f.id
    LEFT JOIN marks AS m ON m.id = f.id
    WHERE f.model = $model
)
"""

_LOCK_BACKOFF_FIRST_S = 0.05
_LOCK_BACKOFF_MAX_S = 1.0
_MAX_LISTED_ERRORS = 10


class FeedbackStoreLockedError(IncrementalError):
    """Another process held the DuckDB file for longer than the store's lock timeout."""


class FeedbackSchemaError(IncrementalError):
    """The DuckDB file is missing, not initialized, or at a schema version this code cannot use."""


def split_for(feedback_id: str, eval_share: float) -> Literal["train", "eval"]:
    """'eval' or 'train' for a row id: a pure function of the id, so a row never changes side.

    The first 8 hex digits of sha256(id), modulo 10 000, fall below `eval_share * 10 000` for
    roughly `eval_share` of all ids.
    """
    bucket = int(hashlib.sha256(feedback_id.encode("utf-8")).hexdigest()[:8], 16) % 10_000
    return "eval" if bucket < round(eval_share * 10_000) else "train"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class FeedbackInput(BaseModel):
    """One rated output, as a user or an import file gives it. Validated before anything is stored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(pattern=MODEL_NAME.pattern, description="Model the output came from (its folder name).")
    artifact_type: Literal["erd", "api", "prototype"] = Field(description="What was generated.")
    prompt: str = Field(description="The meeting notes the output was generated from.")
    output: str = Field(description="The generated artifact that was rated.")
    rating: Literal["good", "needs_improvement"]
    correction: str | None = Field(None, description="A corrected output; only with rating 'needs_improvement'.")
    source: str = Field("api", min_length=1, description="Where the feedback came from (api, import, ui, ...).")
    generated_by: str | None = Field(
        None, pattern=VERSION_NAME.pattern, description="Version name that generated the output, if known."
    )
    created_at: datetime = Field(default_factory=_utcnow, description="When it was rated; naive times are UTC.")
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        pattern=r"^\S{1,128}$",
        description="Unique row id; a new uuid4 hex when omitted. A duplicate id is refused.",
    )

    @field_validator("prompt", "output")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @field_validator("correction")
    @classmethod
    def _correction_fits_rating(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty; omit it (or pass null) when there is no correction")
        if info.data.get("rating") == "good":
            raise ValueError("a correction is only accepted with rating 'needs_improvement', this row is rated 'good'")
        return value

    @field_validator("created_at", "id", mode="before")
    @classmethod
    def _none_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return _utcnow() if info.field_name == "created_at" else uuid.uuid4().hex
        return value

    @field_validator("created_at")
    @classmethod
    def _as_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


_FIELD_HINTS = {
    "model": "use the model's folder name: lowercase letters, digits, '.', '_' or '-' (e.g. 'tiny')",
    "artifact_type": f"use one of: {', '.join(ARTIFACT_TYPES)}",
    "prompt": "pass the meeting notes the output was generated from",
    "output": "pass the generated artifact that was rated",
    "rating": "use 'good' or 'needs_improvement'",
    "correction": "omit it, or give the corrected output together with rating 'needs_improvement'",
    "source": "omit it, or name where the feedback came from (e.g. 'ui')",
    "generated_by": "omit it, or give a version name like v3_20251105_160000",
    "created_at": "give an ISO 8601 time such as 2025-11-05T16:00:00Z, or omit it for now",
    "id": "omit it for a fresh uuid, or give a unique id of 1-128 characters without spaces",
}


def _describe(error: ValidationError, where: str) -> list[str]:
    """One line per problem: where, which field, what is wrong, how to fix it."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "row"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            hint = f"remove it; known fields: {', '.join(FeedbackInput.model_fields)}"
        elif field == "row":
            hint = "give one object with the fields " + ", ".join(FeedbackInput.model_fields)
        else:
            hint = _FIELD_HINTS.get(field, "")
        if item["type"] not in ("missing", "extra_forbidden") and field != "row":
            message += f" (got {_short(item.get('input'))})"
        lines.append(f"{where}: field '{field}': {message}" + (f"; {hint}" if hint else ""))
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(problems: list[str], *, context: str = "") -> InvalidFeedbackError:
    shown = problems[:_MAX_LISTED_ERRORS]
    more = len(problems) - len(shown)
    head = f"{context}nothing was stored; fix these and retry:" if len(problems) > 1 else f"{context}nothing was stored:"
    body = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
    return InvalidFeedbackError(f"{head}\n  {body}")


def _validate(rows: Iterable[tuple[str, FeedbackInput | Mapping[str, Any]]], context: str = "") -> list[FeedbackInput]:
    """All rows or an error listing every problem; duplicate ids inside the batch are problems too."""
    valid: list[FeedbackInput] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for where, row in rows:
        if isinstance(row, FeedbackInput):
            parsed = row
        elif not isinstance(row, Mapping):
            problems.append(f"{where}: expected an object with feedback fields, got {type(row).__name__}")
            continue
        else:
            try:
                parsed = FeedbackInput.model_validate(dict(row))
            except ValidationError as error:
                problems.extend(_describe(error, where))
                continue
        if parsed.id in first_seen:
            problems.append(
                f"{where}: field 'id': {parsed.id!r} is already used by {first_seen[parsed.id]}; give each row its own id"
            )
            continue
        first_seen[parsed.id] = where
        valid.append(parsed)
    if problems:
        raise _refuse(problems, context=context)
    return valid


@dataclass(frozen=True)
class ImportReport:
    """What an import stored: the ids in file order."""

    path: Path
    ids: tuple[str, ...]
    blank_lines: int


@dataclass(frozen=True)
class CollectedFeedback:
    """A model's feedback as the given lineage sees it; every row is in exactly one table.

    Columns: id, artifact_type, prompt, output, correction, target, rating, source, generated_by,
    created_at and ingested_at (UTC), split, trusted, hold_reason; rows ordered by (created_at, id).
    `trusted` is true for rows that arrived before the parent was accepted.
    """

    model: str
    lineage: tuple[str, ...]
    new: pa.Table  # train split, trainable, not learned by the lineage
    learned: pa.Table  # train split, trainable, learned (new or replayed) by the lineage: the replay pool
    eval: pa.Table  # eval split, trainable: never trained; trusted or arrived with the batch
    rejected: pa.Table  # 'needs_improvement' without a correction, any split: scored, never trained
    held: pa.Table  # held until a person releases them: neither trained nor trusted
    n_excluded: int = 0  # excluded for good: neither trained nor trusted (rows not fetched)


@dataclass(frozen=True)
class FeedbackCounts:
    """Row counts per bucket of `CollectedFeedback`; total = new + learned + eval + rejected + held + excluded."""

    total: int
    new: int
    learned: int
    eval: int
    rejected: int
    held: int = 0
    excluded: int = 0
    trusted_eval: int = 0


@dataclass(frozen=True)
class RowMark:
    """One hold, release, exclusion or inclusion of a feedback row, as recorded (never edited)."""

    seq: int
    feedback_id: str
    action: str
    reason: str
    actor: str
    version: str | None
    at: datetime


@dataclass(frozen=True)
class RunRecord:
    """One retraining run as recorded by the flow."""

    run_id: str
    model: str
    version: str | None
    parent: str | None
    status: str
    reason: str
    started_at: datetime
    finished_at: datetime | None
    details: dict[str, Any] | None


class FeedbackStore:
    """Feedback rows, per-version consumption and run records in one DuckDB file.

    Every method opens the file, does its work and closes it. When another process holds the
    file (DuckDB allows one read-write process or many read-only ones), the open is retried with
    backoff for up to `lock_timeout_s`, then `FeedbackStoreLockedError` is raised.

    `eval_share` only matters when `init()` creates the database: the share is then stored in the
    database and every later insert uses the stored share, whatever a store was opened with, so
    rows never change split (DESIGN invariant 6). A differing share is logged as a warning by `init()`.
    """

    def __init__(self, path: Path, *, lock_timeout_s: float = 30.0, eval_share: float = 0.2) -> None:
        if not 0.0 < eval_share < 1.0:
            raise ConfigurationError(
                f"eval_share={eval_share!r} is out of range; use a share strictly between 0 and 1 (default 0.2)"
            )
        if lock_timeout_s < 0:
            raise ConfigurationError(f"lock_timeout_s={lock_timeout_s!r} is negative; use 0 (no retry) or more seconds")
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.eval_share = eval_share

    # -- schema -------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the database, or migrate it to `SCHEMA_VERSION`. Idempotent.

        A database written by a newer release (higher schema version) is refused untouched.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect(read_only=False) as con:
            con.begin()
            try:
                con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
                found = self._stored_version(con) or 0
                if found > SCHEMA_VERSION:
                    raise self._newer_schema_error(found)
                for step in range(found, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        con.execute(statement)
                con.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [str(SCHEMA_VERSION)],
                )
                con.execute(
                    "INSERT INTO meta VALUES ('eval_share', ?) ON CONFLICT (key) DO NOTHING", [repr(self.eval_share)]
                )
                stored_share = self._stored_share(con)
            except BaseException:
                con.rollback()
                raise
            con.commit()
        if found < SCHEMA_VERSION:
            action = "created" if found == 0 else f"migrated from schema v{found}"
            logger.info("[INCREMENTAL] Feedback store %s %s (schema v%d)", self.path, action, SCHEMA_VERSION)
        if stored_share != self.eval_share:
            logger.warning(
                "[INCREMENTAL] Feedback store %s keeps its eval share %s (asked for %s): rows never change split",
                self.path, stored_share, self.eval_share,
            )

    # -- writing feedback ---------------------------------------------------------------------

    def add(self, row: FeedbackInput | Mapping[str, Any]) -> str:
        """Validate and store one row; returns its id. InvalidFeedbackError if refused."""
        return self._insert(_validate([("feedback", row)]), lambda index: "feedback")[0]

    def add_many(self, rows: Iterable[FeedbackInput | Mapping[str, Any]]) -> list[str]:
        """Validate every row, then store all of them in one transaction, or none."""
        return self._insert(_validate((f"rows[{i}]", row) for i, row in enumerate(rows)), lambda index: f"rows[{index}]")

    def import_file(self, path: Path, *, default_model: str | None = None, source: str = "import") -> ImportReport:
        """Store every row of a JSONL file (one JSON object per line) in one transaction, or none.

        Blank lines are skipped. A row without `model` gets `default_model`, a row without `source`
        gets `source`. Errors name `FILE:LINE` and the field.
        """
        path = Path(path)
        if path.suffix.lower() not in IMPORT_FORMATS:
            raise InvalidFeedbackError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r}; supported: {', '.join(IMPORT_FORMATS)} "
                "(one JSON object per line)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidFeedbackError(f"{path}: no such file; check the path") from None
        except UnicodeDecodeError as error:
            raise InvalidFeedbackError(f"{path}: not UTF-8 text ({error.reason}); save the file as UTF-8") from None
        parsed: list[tuple[str, Any]] = []
        problems: list[str] = []
        blank = 0
        for number, line in enumerate(text.splitlines(), start=1):
            where = f"{path}:{number}"
            if not line.strip():
                blank += 1
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno}); write one JSON object per line")
                continue
            if isinstance(value, dict):
                if default_model is not None:
                    value.setdefault("model", default_model)
                value.setdefault("source", source)
            parsed.append((where, value))
        if problems:
            raise _refuse(problems)
        if not parsed:
            raise InvalidFeedbackError(f"{path}: no feedback rows found; the file is empty or only blank lines")
        rows = _validate(parsed)
        wheres = [where for where, _ in parsed]
        ids = self._insert(rows, lambda index: wheres[index])
        return ImportReport(path=path, ids=tuple(ids), blank_lines=blank)

    def _insert(self, rows: list[FeedbackInput], where: Callable[[int], str]) -> list[str]:
        """Insert validated rows in one transaction; ids already stored are refused (nothing stored)."""
        ids = [row.id for row in rows]
        with self._write() as con:
            share = self._stored_share(con)
            now = _utcnow()
            columns: dict[str, list[Any]] = {name: [] for name in _FEEDBACK_COLUMNS}
            for row in rows:
                for name in _STORED_AS_GIVEN:
                    columns[name].append(getattr(row, name))
                columns["split"].append(split_for(row.id, share))
                columns["ingested_at"].append(now)
            incoming = pa.table(columns, schema=_INCOMING_SCHEMA)
            con.register("incoming_feedback", incoming)
            try:
                taken = {
                    found
                    for (found,) in con.execute(
                        "SELECT f.id FROM feedback AS f JOIN incoming_feedback AS i ON i.id = f.id"
                    ).fetchall()
                }
                if taken:
                    raise _refuse([
                        f"{where(index)}: field 'id': {row_id!r} is already stored; omit 'id' or give a new one"
                        for index, row_id in enumerate(ids)
                        if row_id in taken
                    ])
                con.execute(f"INSERT INTO feedback ({', '.join(_FEEDBACK_COLUMNS)}) SELECT * FROM incoming_feedback")
            finally:
                con.unregister("incoming_feedback")
        return ids

    # -- reading feedback ---------------------------------------------------------------------

    def collect(
        self, model: str, lineage: Sequence[str], *, trusted_before: datetime | None = None
    ) -> CollectedFeedback:
        """The model's feedback split into new / learned / eval / rejected / held for this lineage.

        `lineage` names the current version and its ancestors (current first; empty in base mode);
        `trusted_before` is when the current version was accepted (None in base mode): eval and
        rejected-output rows that arrived by then are `trusted`. "New" is defined by the
        consumption table alone: a train row is new unless a version in the lineage consumed it
        (as new or replay), or it is held or excluded. So rows learned only by descendants
        abandoned in a rollback are new again, and a row committed after a collect is new in the next.
        """
        lineage = self._check_lineage(model, lineage)
        with self._read() as con:
            table = con.sql(
                _CLASSIFIED_SQL + "SELECT * FROM classified WHERE bucket <> 'excluded' ORDER BY created_at, id",
                params=self._classify_params(model, lineage, trusted_before),
            ).to_arrow_table()
            n_excluded = con.sql(
                _CLASSIFIED_SQL + "SELECT count(*) FROM classified WHERE bucket = 'excluded'",
                params=self._classify_params(model, lineage, trusted_before),
            ).fetchall()[0][0]

        def bucket(name: str) -> pa.Table:
            return table.filter(pc.equal(table["bucket"], name)).drop_columns(["bucket"])

        return CollectedFeedback(
            model=model, lineage=lineage,
            new=bucket("new"), learned=bucket("learned"), eval=bucket("eval"), rejected=bucket("rejected"),
            held=bucket("held"), n_excluded=int(n_excluded),
        )  # fmt: skip

    def counts(self, model: str, lineage: Sequence[str], *, trusted_before: datetime | None = None) -> FeedbackCounts:
        """How many of the model's rows are in each bucket of `collect`, without fetching them."""
        lineage = self._check_lineage(model, lineage)
        with self._read() as con:
            row = con.sql(
                _CLASSIFIED_SQL
                + """
                SELECT count(*),
                       count(*) FILTER (WHERE bucket = 'new'),
                       count(*) FILTER (WHERE bucket = 'learned'),
                       count(*) FILTER (WHERE bucket = 'eval'),
                       count(*) FILTER (WHERE bucket = 'rejected'),
                       count(*) FILTER (WHERE bucket = 'held'),
                       count(*) FILTER (WHERE bucket = 'excluded'),
                       count(*) FILTER (WHERE bucket = 'eval' AND trusted)
                FROM classified
                """,
                params=self._classify_params(model, lineage, trusted_before),
            ).fetchall()[0]
        return FeedbackCounts(*(int(value) for value in row))

    @staticmethod
    def _classify_params(model: str, lineage: tuple[str, ...], trusted_before: datetime | None) -> dict[str, Any]:
        if trusted_before is not None and trusted_before.tzinfo is None:
            raise ValueError("trusted_before must be timezone-aware (UTC), e.g. the parent's manifest finalized_at")
        return {"model": model, "lineage": list(lineage), "trusted_before": trusted_before}

    # -- holds and exclusions -----------------------------------------------------------------

    def mark(
        self,
        model: str,
        ids: Iterable[str],
        action: str,
        *,
        reason: str,
        actor: str,
        version: str | None = None,
    ) -> int:
        """Record `action` (hold, release, exclude, include) for each row; returns how many rows changed.

        Rows are never deleted: every mark is appended, and the latest hold/release and the latest
        exclude/include of a row decide its state. A mark that would not change a row's state is
        skipped, so repeating a command is a no-op. Unknown ids are refused (nothing recorded).
        """
        self._check_model(model)
        if action not in MARK_ACTIONS:
            raise ValueError(f"action {action!r} is not a mark; use one of: {', '.join(MARK_ACTIONS)}")
        if not reason.strip():
            raise ValueError(f"a {action} needs a reason (--reason): say why, it is kept with the row")
        if not actor.strip():
            raise ValueError(f"a {action} needs an actor (--by): who or what decided it")
        if version is not None and not VERSION_NAME.match(version):
            raise ValueError(f"version {version!r} is not a version name; expected vN_YYYYMMDD_HHMMSS or None")
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return 0
        kind = ("hold", "release") if action in ("hold", "release") else ("exclude", "include")
        with self._write() as con:
            known = {
                row_id
                for (row_id,) in con.execute(
                    "SELECT id FROM feedback WHERE model = ? AND id IN (SELECT unnest(?::VARCHAR[]))", [model, wanted]
                ).fetchall()
            }
            unknown = [row_id for row_id in wanted if row_id not in known]
            if unknown:
                shown = ", ".join(repr(row_id) for row_id in unknown[:_MAX_LISTED_ERRORS])
                raise InvalidFeedbackError(
                    f"nothing was marked: {len(unknown)} id(s) are not feedback rows of model {model!r}: {shown}; "
                    "check the ids (incremental feedback held lists held rows)"
                )
            state = dict(
                con.execute(
                    """
                    SELECT feedback_id, arg_max(action, seq) FROM row_marks
                    WHERE model = ? AND action IN (?, ?) AND feedback_id IN (SELECT unnest(?::VARCHAR[]))
                    GROUP BY feedback_id
                    """,
                    [model, *kind, wanted],
                ).fetchall()
            )
            resting = kind[1]  # a row with no mark of this kind is released / included
            changing = [row_id for row_id in wanted if state.get(row_id, resting) != action]
            if changing:
                now = _utcnow()
                con.executemany(
                    "INSERT INTO row_marks (model, feedback_id, action, reason, actor, version, marked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(model, row_id, action, reason, actor, version, now) for row_id in changing],
                )
        if changing:
            logger.info("[INCREMENTAL] %s %d feedback rows of %s: %s (by %s)", action.capitalize(), len(changing), model, reason, actor)
        return len(changing)

    def held_by(self, model: str, version: str) -> tuple[str, ...]:
        """Ids of the rows currently held whose hold named `version` (its rejected batch or its screening)."""
        self._check_model(model)
        with self._read() as con:
            rows = con.execute(
                """
                SELECT feedback_id FROM row_marks
                WHERE model = ? AND action IN ('hold', 'release')
                GROUP BY feedback_id
                HAVING arg_max(action, seq) = 'hold' AND arg_max(version, seq) = ?
                ORDER BY feedback_id
                """,
                [model, version],
            ).fetchall()
        return tuple(row_id for (row_id,) in rows)

    def marks(self, model: str, ids: Sequence[str] | None = None) -> tuple[RowMark, ...]:
        """The recorded marks of the model's rows (all, or of `ids`), oldest first."""
        self._check_model(model)
        with self._read() as con:
            rows = con.execute(
                """
                SELECT seq, feedback_id, action, reason, actor, version, marked_at FROM row_marks
                WHERE model = ? AND (?::VARCHAR[] IS NULL OR feedback_id IN (SELECT unnest(?::VARCHAR[])))
                ORDER BY seq
                """,
                [model, None if ids is None else list(ids), None if ids is None else list(ids)],
            ).fetchall()
        return tuple(RowMark(*row) for row in rows)

    # -- the parent-score cache ---------------------------------------------------------------

    def cached_scores(self, model: str, version: str, scorer: str, hashes: Sequence[str]) -> dict[str, tuple]:
        """{example_hash: (nll_sum, n_tokens, text)} for the hashes `version` was already scored on by `scorer`."""
        self._check_model(model)
        if not hashes:
            return {}
        with self._read() as con:
            rows = con.execute(
                """
                SELECT example_hash, nll_sum, n_tokens, text FROM score_cache
                WHERE model = ? AND version = ? AND scorer = ? AND example_hash IN (SELECT unnest(?::VARCHAR[]))
                """,
                [model, version, scorer, list(hashes)],
            ).fetchall()
        return {row[0]: tuple(row[1:]) for row in rows}

    def cache_scores(self, model: str, version: str, scorer: str, entries: Mapping[str, tuple]) -> None:
        """Store {example_hash: (nll_sum, n_tokens, text)}; an entry already cached is kept (scores are pure)."""
        self._check_model(model)
        if not VERSION_NAME.match(version):
            raise ValueError(f"version {version!r} is not a version name; only finished versions' scores are cached")
        if not entries:
            return
        now = _utcnow()
        table = pa.table(
            {
                "model": [model] * len(entries),
                "version": [version] * len(entries),
                "scorer": [scorer] * len(entries),
                "example_hash": list(entries),
                "nll_sum": [value[0] for value in entries.values()],
                "n_tokens": [value[1] for value in entries.values()],
                "text": [value[2] for value in entries.values()],
                "scored_at": [now] * len(entries),
            },
            schema=pa.schema(
                [("model", pa.string()), ("version", pa.string()), ("scorer", pa.string()), ("example_hash", pa.string()),
                 ("nll_sum", pa.float64()), ("n_tokens", pa.int64()), ("text", pa.string()), ("scored_at", _UTC_TIMESTAMP)]
            ),
        )  # fmt: skip
        with self._write() as con:
            con.register("incoming_scores", table)
            try:
                con.execute("INSERT INTO score_cache SELECT * FROM incoming_scores ON CONFLICT DO NOTHING")
            finally:
                con.unregister("incoming_scores")

    # -- consumption and runs -----------------------------------------------------------------

    def record_consumption(
        self,
        model: str,
        version: str,
        *,
        new_ids: Iterable[str],
        replay_ids: Iterable[str],
        eval_ids: Iterable[str],
        rejected_ids: Iterable[str] = (),
    ) -> None:
        """Record which rows `version` consumed, for every candidate (accepted or rejected).

        Idempotent: recording the same rows again is a no-op; recording a different set for a
        version that already has one is refused, since a version's record never changes. Rows must
        belong to the model and fit their role: new/replay rows are trainable train-split rows,
        eval rows trainable eval-split rows, rejected rows uncorrected 'needs_improvement' rows.
        """
        self._check_model(model)
        if not VERSION_NAME.match(version):
            raise ValueError(f"version {version!r} is not a version name; expected vN_YYYYMMDD_HHMMSS")
        wanted: dict[str, str] = {}
        for role, ids in (("new", new_ids), ("replay", replay_ids), ("eval", eval_ids), ("rejected", rejected_ids)):
            for row_id in ids:
                if row_id in wanted and wanted[row_id] != role:
                    raise ValueError(f"row {row_id!r} is listed as both {wanted[row_id]!r} and {role!r}; give each row one role")
                wanted[row_id] = role
        with self._write() as con:
            existing = dict(
                con.execute(
                    "SELECT feedback_id, role FROM version_rows WHERE model = ? AND version = ?", [model, version]
                ).fetchall()
            )
            if existing == wanted:
                logger.debug("[INCREMENTAL] Consumption of %s/%s already recorded", model, version)
                return
            if existing:
                raise IncrementalError(
                    f"version {version} of model {model!r} already recorded {len(existing)} consumed rows, and they "
                    f"differ from these {len(wanted)}; a version's record is immutable, so record a new version instead"
                )
            kinds = dict(
                con.execute(
                    """
                    SELECT id,
                           CASE WHEN rating = 'needs_improvement' AND correction IS NULL THEN 'rejected' ELSE split END
                    FROM feedback WHERE model = ? AND id IN (SELECT unnest(?::VARCHAR[]))
                    """,
                    [model, list(wanted)],
                ).fetchall()
            )
            expected = {"new": "train", "replay": "train", "eval": "eval", "rejected": "rejected"}
            problems = []
            for row_id, role in wanted.items():
                kind = kinds.get(row_id)
                if kind is None:
                    problems.append(f"{role} row {row_id!r} is not a feedback row of model {model!r}")
                elif kind != expected[role]:
                    problems.append(f"{role} row {row_id!r} is a {kind!r} row; {role} rows must be {expected[role]!r} rows")
            if problems:
                shown = "\n  ".join(problems[:_MAX_LISTED_ERRORS])
                raise IncrementalError(
                    f"consumption of {version} refused, nothing was recorded; pass the ids that collect() returned:\n  {shown}"
                )
            consumed = pa.table(
                {
                    "model": [model] * len(wanted),
                    "version": [version] * len(wanted),
                    "feedback_id": list(wanted),
                    "role": list(wanted.values()),
                },
                schema=pa.schema([(name, pa.string()) for name in ("model", "version", "feedback_id", "role")]),
            )
            con.register("incoming_consumption", consumed)
            try:
                con.execute("INSERT INTO version_rows SELECT * FROM incoming_consumption")
            finally:
                con.unregister("incoming_consumption")

    def record_run(
        self,
        run_id: str,
        model: str,
        *,
        status: RunStatus,
        reason: str = "",
        version: str | None = None,
        parent: str | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Insert or update the run record `run_id` (record 'running' first, the outcome later).

        On update, `started_at` keeps its first value. A finished status without `finished_at`
        gets the current time. `details` must be JSON-serializable.
        """
        self._check_model(model)
        if status not in RUN_STATUSES:
            raise ValueError(f"status {status!r} is not a run status; use one of: {', '.join(RUN_STATUSES)}")
        for field, value in (("version", version), ("parent", parent)):
            if value is not None and not VERSION_NAME.match(value):
                raise ValueError(f"{field} {value!r} is not a version name; expected vN_YYYYMMDD_HHMMSS or None")
        try:
            details_json = None if details is None else json.dumps(dict(details), sort_keys=True)
        except TypeError as error:
            raise ValueError(f"details of run {run_id!r} are not JSON-serializable ({error}); pass plain values") from None
        now = _utcnow()
        if finished_at is None and status != "running":
            finished_at = now
        with self._write() as con:
            con.execute(
                """
                INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (run_id) DO UPDATE SET
                    version = excluded.version, parent = excluded.parent, status = excluded.status,
                    reason = excluded.reason, finished_at = excluded.finished_at, details = excluded.details
                """,
                [run_id, model, version, parent, status, reason, started_at or now, finished_at, details_json],
            )

    def runs(self, model: str, limit: int = 20) -> tuple[RunRecord, ...]:
        """The model's most recent run records, newest first."""
        self._check_model(model)
        if limit < 1:
            raise ValueError(f"limit={limit!r} must be at least 1")
        with self._read() as con:
            rows = con.execute(
                """
                SELECT run_id, model, version, parent, status, reason, started_at, finished_at, details
                FROM runs WHERE model = ? ORDER BY started_at DESC, run_id DESC LIMIT ?
                """,
                [model, limit],
            ).fetchall()
        return tuple(
            RunRecord(*row[:8], details=None if row[8] is None else json.loads(row[8]))  # type: ignore[arg-type]
            for row in rows
        )

    # -- connections --------------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._open(read_only=read_only)
        try:
            # Timestamps come back in UTC whatever the machine's zone is.
            con.execute("SET TimeZone = 'UTC'")
            yield con
        finally:
            con.close()

    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = _LOCK_BACKOFF_FIRST_S
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as error:
                if "could not set lock" not in str(error).lower():
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FeedbackStoreLockedError(
                        f"feedback database {self.path} is locked: another process holds it "
                        f"({'read-only access' if read_only else 'write access'} waited {self.lock_timeout_s:g} s). "
                        "Wait for that process (a training run, a CLI command) to finish, or stop it, then retry; "
                        f"a longer wait is INCREMENTAL_DB_LOCK_TIMEOUT_S. DuckDB said: {error}"
                    ) from error
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _LOCK_BACKOFF_MAX_S)

    @contextmanager
    def _read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._require_file()
        with self._connect(read_only=True) as con:
            self._require_schema(con)
            yield con

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._require_file()
        with self._connect(read_only=False) as con:
            self._require_schema(con)
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    def _require_file(self) -> None:
        # Checked first so a mistyped path never leaves a stray empty database behind.
        if not self.path.is_file():
            raise FeedbackSchemaError(
                f"no feedback database at {self.path}; create it with FeedbackStore.init() "
                "(or check INCREMENTAL_DB_PATH)"
            )

    def _require_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        found = self._stored_version(con)
        if found is None:
            raise FeedbackSchemaError(f"{self.path} is not an initialized feedback database; run FeedbackStore.init() first")
        if found > SCHEMA_VERSION:
            raise self._newer_schema_error(found)
        if found < SCHEMA_VERSION:
            raise FeedbackSchemaError(
                f"{self.path} has feedback schema v{found}, this code needs v{SCHEMA_VERSION}; "
                "run FeedbackStore.init() to migrate it"
            )

    def _newer_schema_error(self, found: int) -> FeedbackSchemaError:
        return FeedbackSchemaError(
            f"{self.path} has feedback schema v{found}, newer than v{SCHEMA_VERSION} that this code knows; "
            "it was written by a newer release of incremental-lora: upgrade this installation (the file was not changed)"
        )

    @staticmethod
    def _stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
        has_meta = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' AND table_name = 'meta'"
        ).fetchall()
        if not has_meta[0][0]:
            return None
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        return int(rows[0][0]) if rows else None

    @staticmethod
    def _stored_share(con: duckdb.DuckDBPyConnection) -> float:
        # fetchall, not fetchone: DuckDB 2 refuses register() while a result is left unread.
        rows = con.execute("SELECT value FROM meta WHERE key = 'eval_share'").fetchall()
        assert rows, "init() stores eval_share with the schema"
        return float(rows[0][0])

    @staticmethod
    def _check_model(model: str) -> None:
        if not MODEL_NAME.match(model):
            raise ValueError(f"model {model!r} is not a model name; use lowercase letters, digits, '.', '_' or '-'")

    def _check_lineage(self, model: str, lineage: Sequence[str]) -> tuple[str, ...]:
        self._check_model(model)
        if isinstance(lineage, str):
            raise TypeError("lineage must be a sequence of version names (current first), not one string")
        names = tuple(lineage)
        for name in names:
            if not VERSION_NAME.match(name):
                raise ValueError(f"lineage entry {name!r} is not a version name; expected vN_YYYYMMDD_HHMMSS")
        return names
