"""Holds and exclusions of feedback rows: an append-only log, the latest mark of each kind decides.

A held row (a rejected batch, or flagged by screening) waits until a person releases or excludes
it; an excluded row is out for good until included again. Nothing is ever deleted or edited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from incremental.errors import InvalidFeedbackError
from incremental.feedback.database import MAX_LISTED_ERRORS, FeedbackDatabase, check_model, utcnow
from incremental.layout import VERSION_NAME

logger = logging.getLogger(__name__)

MARK_ACTIONS: tuple[str, ...] = ("hold", "release", "exclude", "include")

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


class RowMarks(FeedbackDatabase):
    """Marking rows held / released / excluded / included, and reading the marks back."""

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
        check_model(model)
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
                shown = ", ".join(repr(row_id) for row_id in unknown[:MAX_LISTED_ERRORS])
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
                now = utcnow()
                con.executemany(
                    "INSERT INTO row_marks (model, feedback_id, action, reason, actor, version, marked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(model, row_id, action, reason, actor, version, now) for row_id in changing],
                )
        if changing:
            logger.info("[INCREMENTAL] %s %d feedback rows of %s: %s (by %s)", action.capitalize(), len(changing), model, reason, actor)
        return len(changing)

    def held_by(self, model: str, version: str) -> tuple[str, ...]:
        """Ids of the rows currently held whose hold named `version` (its rejected batch or its screening)."""
        check_model(model)
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
        check_model(model)
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
