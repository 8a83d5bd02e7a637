"""Who rated what, and how their ratings fared: one record per rater of a model.

A record counts a rater's rows and what the marks log says about them: waiting in a hold, released
or excluded by a person, held by the gate with a rejected batch. It is evidence for a person (or for
screening's acceptance sampling) to weigh, not a verdict: this module knows nothing about lineage,
scores or what a hold's rule means, and it decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from incremental.feedback.database import FeedbackDatabase, check_model
from incremental.feedback.marks import MACHINE_ACTORS, MARK_STATE_SQL


@dataclass(frozen=True)
class RaterRecord:
    """One rater's rows of a model and what became of them; `rater` None gathers the rows whose
    rater is not known. `held`, `released` and `excluded` are disjoint states now; `blamed_by_gate`
    counts rows ever held with a rejected batch, whatever happened to them since."""

    rater: str | None
    rows: int  # every row of theirs for the model
    held: int  # waiting for a person: the latest hold/release mark is a hold, not excluded
    released: int  # a person released them after a hold (the latest hold/release mark), not excluded
    excluded: int  # excluded now
    blamed_by_gate: int  # ever held by the gate (actor 'gate')

    @property
    def settled(self) -> int:
        """Rows a person decided: released or excluded."""
        return self.released + self.excluded

    @property
    def bad_share(self) -> float:
        """(excluded + blamed_by_gate) / rows: 0 for a rater without rows. A row excluded after the
        gate blamed it counts twice, as two pieces of evidence against it."""
        return (self.excluded + self.blamed_by_gate) / max(self.rows, 1)


# Per rater of the model: the counts of `RaterRecord`. A row without marks is counted in `rows` only.
_RECORDS_SQL = f"""
SELECT f.rater,
       count(*),
       count(*) FILTER (WHERE h.action = 'hold' AND NOT s.excluded),
       count(*) FILTER (WHERE h.action = 'release' AND h.actor NOT IN (SELECT unnest($machines::VARCHAR[])) AND NOT s.excluded),
       count(*) FILTER (WHERE s.excluded),
       count(*) FILTER (WHERE s.blamed_by_gate)
FROM feedback AS f
LEFT JOIN ({MARK_STATE_SQL}) AS s ON s.feedback_id = f.id
LEFT JOIN row_marks AS h ON h.seq = s.hold_seq
WHERE f.model = $model
GROUP BY f.rater
ORDER BY f.rater NULLS LAST
"""


class RaterRecords(FeedbackDatabase):
    """Reading each rater's record."""

    def rater_records(self, model: str) -> dict[str | None, RaterRecord]:
        """Every rater of the model's rows (None: rater not known) and their record, by rater name
        (the unknown rater last). One read of the file."""
        check_model(model)
        with self._read() as con:
            rows = con.execute(_RECORDS_SQL, {"model": model, "machines": list(MACHINE_ACTORS)}).fetchall()
        return {
            rater: RaterRecord(
                rater=rater, rows=total, held=held, released=released, excluded=excluded, blamed_by_gate=blamed
            )
            for rater, total, held, released, excluded, blamed in rows
        }
