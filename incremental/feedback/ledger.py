"""The consumption ledger: which rows each version trained on, as new rows or as replay.

It records training only: the rows a version was judged on are in its manifest and `scores.parquet`.
Written before the version folder appears (DESIGN invariant), immutable afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pyarrow as pa

from incremental.errors import IncrementalError
from incremental.feedback.database import MAX_LISTED_ERRORS, FeedbackDatabase, check_model
from incremental.layout import VERSION_NAME

logger = logging.getLogger(__name__)


class ConsumptionLedger(FeedbackDatabase):
    """Recording and reading what each version trained on."""

    def record_consumption(self, model: str, version: str, *, new_ids: Iterable[str], replay_ids: Iterable[str]) -> None:
        """Record which rows `version` trained on, for every candidate (accepted or rejected).

        Idempotent: recording the same rows again is a no-op; recording a different set for a
        version that already has one is refused, since a version's record never changes. Rows must
        be trainable train-split rows of the model. The cost is O(rows of this version).
        """
        check_model(model)
        if not VERSION_NAME.match(version):
            raise ValueError(f"version {version!r} is not a version name; expected vN_YYYYMMDD_HHMMSS")
        wanted: dict[str, str] = {}
        for role, ids in (("new", new_ids), ("replay", replay_ids)):
            for row_id in ids:
                if row_id in wanted and wanted[row_id] != role:
                    raise ValueError(f"row {row_id!r} is listed as both {wanted[row_id]!r} and {role!r}; give each row one role")
                wanted[row_id] = role
        consumed = pa.table(
            {
                "model": [model] * len(wanted),
                "version": [version] * len(wanted),
                "feedback_id": list(wanted),
                "role": list(wanted.values()),
            },
            schema=pa.schema([(name, pa.string()) for name in ("model", "version", "feedback_id", "role")]),
        )
        with self._write() as con:
            existing = dict(
                con.execute(
                    "SELECT feedback_id, role FROM version_rows WHERE model = ? AND version = ? AND role IN ('new', 'replay')",
                    [model, version],
                ).fetchall()
            )
            if existing == wanted:
                logger.debug("[INCREMENTAL] Consumption of %s/%s already recorded", model, version)
                return
            if existing:
                raise IncrementalError(
                    f"version {version} of model {model!r} already recorded {len(existing)} trained rows, and they "
                    f"differ from these {len(wanted)}; a version's record is immutable, so record a new version instead"
                )
            con.register("incoming_consumption", consumed)
            try:
                problems = con.execute(
                    """
                    SELECT i.role, i.feedback_id,
                           CASE WHEN f.id IS NULL THEN 'missing'
                                WHEN f.rating = 'needs_improvement' AND f.correction IS NULL THEN 'rejected'
                                ELSE f.split END AS kind
                    FROM incoming_consumption AS i
                    LEFT JOIN feedback AS f ON f.id = i.feedback_id AND f.model = i.model
                    WHERE f.id IS NULL OR f.split <> 'train' OR (f.rating = 'needs_improvement' AND f.correction IS NULL)
                    LIMIT ?
                    """,
                    [MAX_LISTED_ERRORS],
                ).fetchall()
                if problems:
                    shown = "\n  ".join(
                        f"{role} row {row_id!r} is not a feedback row of model {model!r}"
                        if kind == "missing"
                        else f"{role} row {row_id!r} is a {kind!r} row; {role} rows must be 'train' rows"
                        for role, row_id, kind in problems
                    )
                    raise IncrementalError(
                        f"consumption of {version} refused, nothing was recorded; pass the ids that collect() returned:\n  {shown}"
                    )
                con.execute("INSERT INTO version_rows SELECT * FROM incoming_consumption")
            finally:
                con.unregister("incoming_consumption")

    def discard_unfinished(self, model: str, version: str) -> int:
        """Remove the record of a version that never appeared: its run failed between recording and
        finalizing (the caller checks that the folder does not exist). Returns the rows removed."""
        check_model(model)
        if not VERSION_NAME.match(version):
            raise ValueError(f"version {version!r} is not a version name; expected vN_YYYYMMDD_HHMMSS")
        with self._write() as con:
            (removed,) = con.execute(
                "SELECT count(*) FROM version_rows WHERE model = ? AND version = ?", [model, version]
            ).fetchone()
            con.execute("DELETE FROM version_rows WHERE model = ? AND version = ?", [model, version])
        if removed:
            logger.info("[INCREMENTAL] Removed the consumption record of unfinished %s/%s (%d rows)", model, version, removed)
        return removed

    def trained_on(self, model: str, version: str) -> dict[str, tuple[str, ...]]:
        """{'new': ids, 'replay': ids} that `version` trained on, as recorded (empty tuples when nothing is)."""
        check_model(model)
        with self._read() as con:
            rows = con.execute(
                "SELECT role, feedback_id FROM version_rows WHERE model = ? AND version = ? AND role IN ('new', 'replay')",
                [model, version],
            ).fetchall()
        found: dict[str, list[str]] = {"new": [], "replay": []}
        for role, row_id in rows:
            found[role].append(row_id)
        return {role: tuple(ids) for role, ids in found.items()}
