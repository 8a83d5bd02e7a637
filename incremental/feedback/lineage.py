"""What a lineage has learned, and what a run should use: new rows, the replay pool, a bounded eval window.

The "learned" record (`learned_rows`) holds the rows the current lineage trained on as new rows.
It is brought up to date on the first read after a change of lineage: after a promotion only the
new versions' rows are added (O(new)); after a rollback, or when the record belongs to another
branch, it is rebuilt from the ledger. So `collect` never reclassifies history through the ledger,
and fetches text only for the rows a run uses: the new rows and the eval rows it scores. The replay
pool comes back as ids; `rows()` fetches the text of the sampled ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from incremental.errors import IncrementalError
from incremental.feedback.database import FeedbackDatabase, check_lineage, check_model, utcnow

logger = logging.getLogger(__name__)

UNRECORDED_GENERATOR = "unrecorded"  # a row whose generating version is not known

# The columns of every text table `collect` returns. `target` is the correction when there is one,
# else the output; `rejected_output` is the output a correction replaced (NULL otherwise); `rater`
# who rated the row (NULL: not known).
ROW_COLUMNS = (
    "id", "artifact_type", "prompt", "target", "rejected_output", "rating", "source", "generated_by",
    "created_at", "ingested_at", "trusted", "hold_reason", "rater",
)  # fmt: skip

# Every row of a model lands in exactly one bucket. Trainable = 'good' (target = output) or
# 'needs_improvement' with a correction (target = correction). An excluded row is out for good
# (until included again), a held one until a person releases it: neither is trained or trusted.
# `trusted` marks rows that arrived before the parent was accepted ($trusted_before; NULL in base
# mode: nothing is trusted). Only narrow columns here: no text is read to classify. Materialized
# once per read as a temporary table, which the queries below share.
_CLASSIFY_SQL = """
CREATE OR REPLACE TEMP TABLE classified AS
WITH marks AS (
    SELECT feedback_id AS id,
           arg_max(action, seq) FILTER (WHERE action IN ('hold', 'release')) AS hold_state,
           arg_max(reason, seq) FILTER (WHERE action IN ('hold', 'release')) AS hold_reason,
           arg_max(action, seq) FILTER (WHERE action IN ('exclude', 'include')) AS exclude_state
    FROM row_marks WHERE model = $model GROUP BY feedback_id
),
classified AS (
    SELECT
        f.id, f.artifact_type, f.created_at,
        coalesce(f.ingested_at <= $trusted_before::TIMESTAMPTZ, false) AS trusted,
        m.hold_reason,
        CASE
            WHEN m.exclude_state = 'exclude' THEN 'excluded'
            WHEN m.hold_state = 'hold' THEN 'held'
            WHEN f.rating = 'needs_improvement' AND f.correction IS NULL THEN 'rejected'
            WHEN f.split = 'eval' THEN 'eval'
            WHEN l.feedback_id IS NULL THEN 'new'
            ELSE 'learned'
        END AS bucket
    FROM feedback AS f
    LEFT JOIN learned_rows AS l ON l.model = $model AND l.feedback_id = f.id
    LEFT JOIN marks AS m ON m.id = f.id
    WHERE f.model = $model
)
SELECT * FROM classified
"""

# Which eval and rejected-output rows a run scores. Rows that arrived with the batch (untrusted)
# always; of the trusted ones, the most recent $per_type of each artifact type, plus the $anchors
# oldest trusted eval rows: they give prompt gain its fixed partner notes, so partners (and the
# parent's cached scores) stay put while the window moves. $per_type NULL: every row.
_SELECTED_SQL = """
WITH ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY bucket, trusted, artifact_type ORDER BY created_at DESC, id DESC) AS recent_rank,
           row_number() OVER (PARTITION BY bucket, trusted ORDER BY created_at, id) AS oldest_rank
    FROM classified WHERE bucket IN ('new', 'eval', 'rejected')
),
selected AS (
    SELECT * FROM ranked
    WHERE bucket = 'new' OR NOT trusted OR $per_type IS NULL OR recent_rank <= $per_type
       OR (bucket = 'eval' AND oldest_rank <= $anchors)
)
SELECT s.id, s.bucket, s.artifact_type, f.prompt,
       coalesce(f.correction, f.output) AS target,
       CASE WHEN f.correction IS NOT NULL THEN f.output END AS rejected_output,
       f.rating, f.source, f.generated_by, f.created_at, f.ingested_at, s.trusted, s.hold_reason, f.rater
FROM selected AS s JOIN feedback AS f ON f.id = s.id
ORDER BY f.created_at, f.id
"""


@dataclass(frozen=True)
class EvalWindow:
    """How many trusted eval rows a run scores; None per type means all of them."""

    per_type: int | None = None
    anchors: int = 10

    def __post_init__(self) -> None:
        if self.per_type is not None and self.per_type < 1:
            raise ValueError(f"per_type={self.per_type!r}: score at least 1 trusted row per type, or None for all")
        if self.anchors < 0:
            raise ValueError(f"anchors={self.anchors!r} must be 0 or more")


@dataclass(frozen=True)
class CollectedFeedback:
    """A model's feedback as the given lineage sees it, with text only for the rows a run uses.

    `new`, `eval` and `rejected` have the columns of `ROW_COLUMNS`, oldest first. `learned` is the
    replay pool as ids only (id, created_at), oldest first; `FeedbackStore.rows()` fetches text. `held`
    lists held rows without text (id, artifact_type, rating, split, source, hold_reason, rater). `eval` and
    `rejected` are the window a run scores; `available` counts every row of each bucket.
    """

    model: str
    lineage: tuple[str, ...]
    new: pa.Table  # train split, trainable, not learned by the lineage
    learned: pa.Table  # train split, trainable, learned by the lineage: the replay pool (ids)
    eval: pa.Table  # eval split, trainable, in the window: never trained; trusted or arrived with the batch
    rejected: pa.Table  # 'needs_improvement' without a correction, in the window: scored, never trained
    held: pa.Table  # held until a person releases them: neither trained nor trusted
    n_excluded: int = 0  # excluded for good: neither trained nor trusted (rows not fetched)
    available: dict[str, int] = field(default_factory=dict)  # rows per bucket before the window
    window: EvalWindow = EvalWindow()

    def without_released(self, table: pa.Table) -> pa.Table:
        """The rows of `table` (`new` or `eval`) that no person has released. A row whose latest
        hold/release mark is a release carries that release's reason in `hold_reason` (a held row is
        never in `new` or `eval`), so a non-null `hold_reason` here means a person looked at the row
        and let it through: screening must not hold it again."""
        return table.filter(pc.is_null(table.column("hold_reason")))

    def new_by_generating_version(self) -> dict[str, int]:
        """How many new rows each version generated (`generated_by`), for the manifest; rows that
        name none (imported, or generated before generations were recorded) count as 'unrecorded'."""
        counts = Counter(value or UNRECORDED_GENERATOR for value in self.new.column("generated_by").to_pylist())
        return dict(sorted(counts.items()))

    def window_record(self) -> dict[str, Any]:
        """How the eval rows were chosen, for the manifest."""
        trusted = int(pc.sum(self.eval.column("trusted")).as_py() or 0) if self.eval.num_rows else 0
        return {
            "per_type": self.window.per_type,
            "anchors": self.window.anchors,
            "eval_rows_available": self.available.get("eval", 0),
            "trusted_eval_rows_available": self.available.get("trusted_eval", 0),
            "eval_rows_scored": self.eval.num_rows,
            "trusted_eval_rows_scored": trusted,
            "rejected_rows_available": self.available.get("rejected", 0),
            "rejected_rows_scored": self.rejected.num_rows,
        }


@dataclass(frozen=True)
class FeedbackCounts:
    """Row counts per bucket of `collect`; total = new + learned + eval + rejected + held + excluded."""

    total: int
    new: int
    learned: int
    eval: int
    rejected: int
    held: int = 0
    excluded: int = 0
    trusted_eval: int = 0


class LineageQueries(FeedbackDatabase):
    """Classifying a model's rows against a lineage, and the learned record behind it."""

    def collect(
        self,
        model: str,
        lineage: Sequence[str],
        *,
        trusted_before: datetime | None = None,
        window: EvalWindow = EvalWindow(),
    ) -> CollectedFeedback:
        """The model's feedback split into new / learned / eval / rejected / held for this lineage.

        `lineage` names the current version and its ancestors (current first; empty in base mode);
        `trusted_before` is when the current version was accepted (None in base mode): eval and
        rejected-output rows that arrived by then are `trusted`. A train row is new unless the
        lineage trained on it or it is held or excluded. So rows learned only by descendants
        abandoned in a rollback are new again, and a row committed after a collect is new in the next.
        One read of the file, after the learned record is brought up to the lineage.
        """
        lineage = check_lineage(model, lineage)
        params = self._classify_params(model, lineage, trusted_before)
        with self._classified(model, lineage, params) as con:
            rows = con.sql(_SELECTED_SQL, params={"per_type": window.per_type, "anchors": window.anchors}).to_arrow_table()
            learned = con.sql("SELECT id, created_at FROM classified WHERE bucket = 'learned' ORDER BY created_at, id").to_arrow_table()
            held = con.sql(
                """SELECT c.id, c.artifact_type, f.rating, f.split, f.source, c.hold_reason, f.rater
                   FROM classified AS c JOIN feedback AS f ON f.id = c.id
                   WHERE c.bucket = 'held' ORDER BY c.created_at, c.id"""
            ).to_arrow_table()
            counts = self._counts(con)

        buckets = rows.column("bucket")

        def bucket(name: str) -> pa.Table:
            return rows.filter(pc.equal(buckets, name)).select(list(ROW_COLUMNS))

        return CollectedFeedback(
            model=model, lineage=lineage,
            new=bucket("new"), learned=learned, eval=bucket("eval"), rejected=bucket("rejected"), held=held,
            n_excluded=counts.excluded,
            available={"eval": counts.eval, "trusted_eval": counts.trusted_eval, "rejected": counts.rejected},
            window=window,
        )  # fmt: skip

    def counts(self, model: str, lineage: Sequence[str], *, trusted_before: datetime | None = None) -> FeedbackCounts:
        """How many of the model's rows are in each bucket of `collect`, without fetching them."""
        lineage = check_lineage(model, lineage)
        with self._classified(model, lineage, self._classify_params(model, lineage, trusted_before)) as con:
            return self._counts(con)

    def rows(self, model: str, ids: Sequence[str]) -> pa.Table:
        """The rows `ids` (columns of `ROW_COLUMNS`, `trusted` false) in the order given; unknown ids are an error."""
        check_model(model)
        wanted = pa.table({"id": pa.array(list(ids), pa.string()), "position": pa.array(range(len(ids)), pa.int64())})
        with self._read() as con:
            con.register("wanted_rows", wanted)
            try:
                found = con.sql(
                    """
                    SELECT f.id, f.artifact_type, f.prompt, coalesce(f.correction, f.output) AS target,
                           CASE WHEN f.correction IS NOT NULL THEN f.output END AS rejected_output,
                           f.rating, f.source, f.generated_by, f.created_at, f.ingested_at,
                           false AS trusted, NULL::VARCHAR AS hold_reason, f.rater
                    FROM wanted_rows AS w JOIN feedback AS f ON f.id = w.id AND f.model = $model
                    ORDER BY w.position
                    """,
                    params={"model": model},
                ).to_arrow_table()
            finally:
                con.unregister("wanted_rows")
        if found.num_rows != len(ids):
            missing = sorted(set(ids) - set(found.column("id").to_pylist()))[:10]
            raise ValueError(f"{len(ids) - found.num_rows} ids are not feedback rows of model {model!r}: {missing}")
        return found

    def sync_learned(self, model: str, lineage: Sequence[str]) -> str:
        """Bring the learned record up to `lineage`: 'current' (nothing to do), 'advanced' or 'rebuilt'.

        Advanced: the record's lineage is a tail of this one (versions were promoted since), so only
        the new versions' trained rows are added. Rebuilt: anything else (a rollback, a first use, a
        record of another branch), from the ledger rows of every version in the lineage.
        """
        lineage = check_lineage(model, lineage)
        with self._read() as con:
            if self._recorded_lineage(con, model) == lineage:
                return "current"
        with self._write() as con:
            recorded = self._recorded_lineage(con, model)  # again, under the write lock
            if recorded == lineage:
                return "current"
            gained = len(lineage) - len(recorded or ())
            if recorded is not None and gained > 0 and lineage[gained:] == recorded:
                action, versions = "advanced", list(lineage[:gained])
            else:
                action, versions = "rebuilt", list(lineage)
                con.execute("DELETE FROM learned_rows WHERE model = ?", [model])
            con.execute(
                """
                INSERT INTO learned_rows
                SELECT model, feedback_id, min(version) FROM version_rows
                WHERE model = ? AND role IN ('new', 'replay') AND version IN (SELECT unnest(?::VARCHAR[]))
                GROUP BY model, feedback_id
                ON CONFLICT DO NOTHING
                """,
                [model, versions],
            )
            con.execute(
                """
                INSERT INTO learned_lineage VALUES (?, ?, ?)
                ON CONFLICT (model) DO UPDATE SET lineage = excluded.lineage, synced_at = excluded.synced_at
                """,
                [model, list(lineage), utcnow()],
            )
        logger.debug("[INCREMENTAL] Learned record of %s %s to %s", model, action, lineage[0] if lineage else "base")
        return action

    @staticmethod
    def _recorded_lineage(con: duckdb.DuckDBPyConnection, model: str) -> tuple[str, ...] | None:
        rows = con.execute("SELECT lineage FROM learned_lineage WHERE model = ?", [model]).fetchall()
        return tuple(rows[0][0]) if rows else None

    @contextmanager
    def _classified(self, model: str, lineage: tuple[str, ...], params: dict[str, Any]) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read connection holding the temporary table `classified`, made once the learned record follows `lineage`."""
        for _ in range(3):
            with self._read() as con:
                if self._recorded_lineage(con, model) == lineage:
                    con.execute(_CLASSIFY_SQL, params)
                    yield con
                    return
            self.sync_learned(model, lineage)
        raise IncrementalError(
            f"the learned record of {model!r} kept changing to another lineage while this read waited: two processes "
            "collect for different current versions at once (a rollback during a run?); retry when one has finished"
        )

    @staticmethod
    def _counts(con: duckdb.DuckDBPyConnection) -> FeedbackCounts:
        row = con.sql(
            """
            SELECT count(*),
                   count(*) FILTER (WHERE bucket = 'new'),
                   count(*) FILTER (WHERE bucket = 'learned'),
                   count(*) FILTER (WHERE bucket = 'eval'),
                   count(*) FILTER (WHERE bucket = 'rejected'),
                   count(*) FILTER (WHERE bucket = 'held'),
                   count(*) FILTER (WHERE bucket = 'excluded'),
                   count(*) FILTER (WHERE bucket = 'eval' AND trusted)
            FROM classified
            """
        ).fetchall()[0]
        return FeedbackCounts(*(int(value) for value in row))

    @staticmethod
    def _classify_params(model: str, lineage: tuple[str, ...], trusted_before: datetime | None) -> dict[str, Any]:
        if trusted_before is not None and trusted_before.tzinfo is None:
            raise ValueError("trusted_before must be timezone-aware (UTC), e.g. the parent's manifest finalized_at")
        return {"model": model, "trusted_before": trusted_before}
