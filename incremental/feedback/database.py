"""The feedback database: one DuckDB file, short connections, bounded retry on its lock, schema migrations.

Every other part of the store (ingest, lineage, ledger, marks, score cache) works through
`FeedbackDatabase._read()` / `_write()`: a connection is opened for one call and closed at once,
so the file is never held across training or evaluation and the app can keep writing feedback.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from incremental.errors import ConfigurationError, IncrementalError
from incremental.layout import MODEL_NAME, VERSION_NAME

logger = logging.getLogger(__name__)

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
    (
        # v3: the rows the current lineage has learned, kept up to date as versions are promoted
        # (and rebuilt after a rollback), so `collect` never reclassifies the whole history; the
        # run log goes: Prefect's run history and the version manifests say the same, and users read those.
        """
        CREATE TABLE learned_rows (
            model       VARCHAR NOT NULL,
            feedback_id VARCHAR NOT NULL,
            version     VARCHAR NOT NULL,
            PRIMARY KEY (model, feedback_id)
        )
        """,
        """
        CREATE TABLE learned_lineage (
            model     VARCHAR PRIMARY KEY,
            lineage   VARCHAR[] NOT NULL,
            synced_at TIMESTAMPTZ NOT NULL
        )
        """,
        "DROP TABLE runs",
    ),
    (
        # v4: what the served model generated, so a rating names the generation instead of copying
        # its notes and output, and the feedback row knows the version that produced it.
        """
        CREATE TABLE generations (
            id            VARCHAR PRIMARY KEY,
            model         VARCHAR NOT NULL,
            version       VARCHAR,
            artifact_type VARCHAR NOT NULL CHECK (artifact_type IN ('erd', 'api', 'prototype')),
            notes         VARCHAR NOT NULL,
            output        VARCHAR NOT NULL,
            decoding      JSON NOT NULL,
            created_at    TIMESTAMPTZ NOT NULL
        )
        """,
    ),
    (
        # v5: who rated each row, so holds, acceptance sampling and a rater's record can tell one
        # rater's rows from another's. NULL: not known (rows stored before, files without the column).
        "ALTER TABLE feedback ADD COLUMN rater VARCHAR",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
MARK_ACTIONS: tuple[str, ...] = ("hold", "release", "exclude", "include")

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")
MAX_LISTED_ERRORS = 10
_LOCK_WAIT_FIRST_S = 0.05
_LOCK_WAIT_MAX_S = 1.0
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")


class FeedbackStoreLockedError(IncrementalError):
    """Another process held the DuckDB file for longer than the store's lock timeout."""


class FeedbackSchemaError(IncrementalError):
    """The DuckDB file is missing, not initialized, or at a schema version this code cannot use."""


def split_for(feedback_id: str, eval_share: float) -> Literal["train", "eval"]:
    """'eval' or 'train' for a row id: a pure function of the id, so a row never changes side.

    The first 8 hex digits of sha256(id), modulo 10 000, fall below `eval_share * 10 000` for
    roughly `eval_share` of all ids. `SPLIT_SQL` is the same function in SQL, for bulk imports.
    """
    bucket = int(hashlib.sha256(feedback_id.encode("utf-8")).hexdigest()[:8], 16) % 10_000
    return "eval" if bucket < round(eval_share * 10_000) else "train"


# split_for(id, share) in DuckDB; $eval_cut is round(share * 10 000).
SPLIT_SQL = "CASE WHEN ('0x' || left(sha256(id), 8))::UBIGINT % 10000 < $eval_cut THEN 'eval' ELSE 'train' END"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _is_lock_conflict(error: BaseException) -> bool:
    return isinstance(error, duckdb.IOException) and "could not set lock" in str(error).lower()


def check_model(model: str) -> None:
    if not MODEL_NAME.match(model):
        raise ValueError(f"model {model!r} is not a model name; use lowercase letters, digits, '.', '_' or '-'")


def check_lineage(model: str, lineage: Sequence[str]) -> tuple[str, ...]:
    check_model(model)
    if isinstance(lineage, str):
        raise TypeError("lineage must be a sequence of version names (current first), not one string")
    names = tuple(lineage)
    for name in names:
        if not VERSION_NAME.match(name):
            raise ValueError(f"lineage entry {name!r} is not a version name; expected vN_YYYYMMDD_HHMMSS")
    return names


class FeedbackDatabase:
    """The DuckDB file: creating and migrating it, and short connections to it.

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
                stored_share = self.stored_share(con)
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

    # -- connections --------------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._open(read_only=read_only)
        try:
            # Timestamps come back in UTC whatever the machine's zone is; no progress bar on the
            # user's terminal from a long import.
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_progress_bar = false")
            yield con
        finally:
            con.close()

    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Connect, retrying with exponential backoff while another process holds the file's lock."""
        retrying = Retrying(
            retry=retry_if_exception(_is_lock_conflict),
            stop=stop_after_delay(self.lock_timeout_s),
            wait=wait_exponential(multiplier=_LOCK_WAIT_FIRST_S, max=_LOCK_WAIT_MAX_S),
            reraise=True,
        )
        try:
            return retrying(duckdb.connect, str(self.path), read_only=read_only)
        except duckdb.IOException as error:
            if not _is_lock_conflict(error):
                raise
            holder = _LOCK_HOLDER.search(str(error))
            who = f"process {holder.group(2)} ({holder.group(1)})" if holder else "another process"
            raise FeedbackStoreLockedError(
                f"feedback database {self.path} is locked: {who} holds it "
                f"({'read-only access' if read_only else 'write access'} waited {self.lock_timeout_s:g} s). "
                "Wait for that process (an import, a CLI command, a writer that keeps it open) to finish, or stop it, "
                f"then retry; a longer wait is INCREMENTAL_DB_LOCK_TIMEOUT_S. DuckDB said: {error}"
            ) from error

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
    def stored_share(con: duckdb.DuckDBPyConnection) -> float:
        # fetchall, not fetchone: DuckDB 2 refuses register() while a result is left unread.
        rows = con.execute("SELECT value FROM meta WHERE key = 'eval_share'").fetchall()
        assert rows, "init() stores eval_share with the schema"
        return float(rows[0][0])
