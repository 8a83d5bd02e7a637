"""Holds and exclusions of feedback rows: an append-only log, the latest mark of each kind decides.

A held row (a rejected batch, or flagged by screening) waits until a person releases or excludes
it; an excluded row is out for good until included again. Nothing is ever deleted or edited.
`held_groups` sorts the rows that wait into groups a person can decide at once (who held them, with
which version, whose rows they are, by which rule). Knows nothing about lineage: a hold holds
whatever version is current.
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
# The actors that mark rows without a person: the run's screening and gate hold, a failed run's
# cleanup releases. Any other actor is a person (`--by`, the login name by default).
MACHINE_ACTORS: tuple[str, ...] = ("screening", "gate", "rollback")
SAMPLE_CHARS = 200  # how much of a sample row's notes and target `held_groups` reads

# Per row of the model that has a mark: its latest hold/release mark (`hold_seq`, NULL when it has
# none), whether its latest exclude/include mark is an exclusion, and whether the gate ever held it.
# The hold mark's own fields come from joining row_marks on `hold_seq` (unique), not from
# arg_max(version, seq), which skips NULL values and would name an older mark's version.
MARK_STATE_SQL = """
SELECT feedback_id,
       max(seq) FILTER (WHERE action IN ('hold', 'release')) AS hold_seq,
       coalesce(arg_max(action, seq) FILTER (WHERE action IN ('exclude', 'include')) = 'exclude', false) AS excluded,
       bool_or(action = 'hold' AND actor = 'gate') AS blamed_by_gate
FROM row_marks WHERE model = $model GROUP BY feedback_id
"""

# The rows waiting for a person (latest hold/release mark a hold, not excluded: an exclusion settles
# a held row), with the hold in effect and the rule it names (the reason's text before its first ': ').
_HELD_SQL = f"""
SELECT s.feedback_id AS id, h.actor, h.version, h.reason, split_part(h.reason, ': ', 1) AS rule,
       h.marked_at AS held_at, f.rater
FROM ({MARK_STATE_SQL}) AS s
JOIN row_marks AS h ON h.seq = s.hold_seq
JOIN feedback AS f ON f.id = s.feedback_id AND f.model = $model
WHERE h.action = 'hold' AND NOT s.excluded
"""

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


def hold_rule(reason: str) -> str:
    """The rule a hold reason names: its text before the first ': ' (all of it when there is none).
    Screening's reasons start with a short rule (`format: ...`); the gate's with its batch
    (`batch of rejected vN_...: ...`)."""
    return reason.split(": ", 1)[0]


@dataclass(frozen=True)
class HeldGroup:
    """Held rows that share who held them (`actor`), the version of the hold, whose rows they are
    (`rater`, None: not known) and the rule of the hold reason; with one sample row to look at."""

    actor: str
    version: str | None
    rater: str | None
    rule: str
    ids: tuple[str, ...]  # sorted
    oldest_held_at: datetime  # when the longest-waiting row of the group was held
    sample_id: str  # the longest-waiting row (then the smallest id)
    sample_type: str
    sample_reason: str  # its hold reason in full
    sample_notes: str  # the first SAMPLE_CHARS characters of its notes
    sample_target: str  # ... of its correction, or of its output when it has none

    @property
    def count(self) -> int:
        return len(self.ids)


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
                f"""
                SELECT s.feedback_id FROM ({MARK_STATE_SQL}) AS s JOIN row_marks AS h ON h.seq = s.hold_seq
                WHERE h.action = 'hold' AND h.version = $version
                ORDER BY s.feedback_id
                """,
                {"model": model, "version": version},
            ).fetchall()
        return tuple(row_id for (row_id,) in rows)

    def held_groups(self, model: str) -> tuple[HeldGroup, ...]:
        """The rows waiting for a person, grouped by (actor, version, rater, rule), the longest-waiting
        group first. Excluded rows are not in any group (they are settled). One read of the file."""
        check_model(model)
        with self._read() as con:
            groups = con.execute(
                f"""
                WITH held AS ({_HELD_SQL})
                SELECT actor, version, rater, rule, list(id ORDER BY id), min(held_at), arg_min(id, (held_at, id))
                FROM held GROUP BY actor, version, rater, rule
                ORDER BY min(held_at), actor, version NULLS FIRST, rater NULLS FIRST, rule
                """,
                {"model": model},
            ).fetchall()
            samples = {
                row[0]: row[1:]
                for row in con.execute(
                    f"""
                    WITH held AS ({_HELD_SQL})
                    SELECT f.id, f.artifact_type, held.reason, left(f.prompt, {SAMPLE_CHARS}),
                           left(coalesce(f.correction, f.output), {SAMPLE_CHARS})
                    FROM feedback AS f JOIN held ON held.id = f.id
                    WHERE f.model = $model AND f.id IN (SELECT unnest($ids::VARCHAR[]))
                    """,
                    {"model": model, "ids": [group[6] for group in groups]},
                ).fetchall()
            }
        return tuple(
            HeldGroup(
                actor=actor, version=version, rater=rater, rule=rule, ids=tuple(ids), oldest_held_at=oldest,
                sample_id=sample, sample_type=samples[sample][0], sample_reason=samples[sample][1],
                sample_notes=samples[sample][2], sample_target=samples[sample][3],
            )
            for actor, version, rater, rule, ids, oldest, sample in groups
        )  # fmt: skip

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
