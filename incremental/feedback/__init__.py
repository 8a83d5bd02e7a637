"""The feedback store: rated outputs, what each version trained on, holds and cached scores, in DuckDB.

Answers "which rows has the current lineage not learned yet?" from the ledger (no timestamp
watermarks). Opens the file briefly for each call and never holds it, so the app can keep writing
while a run trains. Knows nothing about versions beyond their names: the caller passes the lineage
(read from the version tree, DESIGN invariant 8), and nothing about tokenizers or training.

One module per job: `database` (the file, connections, migrations), `ingest` (validated rows and
file imports/exports), `lineage` (new / learned / eval for a lineage), `ledger` (what each version
trained on), `marks` (holds and exclusions, and held rows in groups), `scores` (the parent-score cache),
`generations` (what the served model generated, and ratings by generation id), `raters` (each rater's
record: their rows and what became of them).
"""

from incremental.feedback.database import (
    SCHEMA_VERSION,
    FeedbackSchemaError,
    FeedbackStoreLockedError,
    split_for,
)
from incremental.feedback.generations import (
    AlreadyRatedError,
    Generation,
    Generations,
    UnknownGenerationError,
    new_generation_id,
)
from incremental.feedback.ingest import EXPORT_FORMATS, IMPORT_FORMATS, FeedbackInput, ImportReport
from incremental.feedback.ledger import ConsumptionLedger
from incremental.feedback.lineage import CollectedFeedback, EvalWindow, FeedbackCounts, LineageQueries
from incremental.feedback.marks import MACHINE_ACTORS, MARK_ACTIONS, HeldGroup, RowMark, RowMarks, hold_rule
from incremental.feedback.raters import RaterRecord, RaterRecords
from incremental.feedback.scores import ScoreCache

__all__ = [
    "EXPORT_FORMATS",
    "AlreadyRatedError",
    "Generation",
    "UnknownGenerationError",
    "new_generation_id",
    "IMPORT_FORMATS",
    "MACHINE_ACTORS",
    "MARK_ACTIONS",
    "SCHEMA_VERSION",
    "CollectedFeedback",
    "EvalWindow",
    "FeedbackCounts",
    "FeedbackInput",
    "FeedbackSchemaError",
    "FeedbackStore",
    "FeedbackStoreLockedError",
    "HeldGroup",
    "ImportReport",
    "RaterRecord",
    "RowMark",
    "hold_rule",
    "split_for",
]


class FeedbackStore(Generations, LineageQueries, ConsumptionLedger, RowMarks, RaterRecords, ScoreCache):
    """Feedback rows, the ledger, marks, raters' records and the score cache in one DuckDB file (see `database.FeedbackDatabase`).

    Every method opens the file, does its work and closes it. When another process holds the
    file (DuckDB allows one read-write process or many read-only ones), the open is retried with
    exponential backoff for up to `lock_timeout_s`, then `FeedbackStoreLockedError` names the holder.
    """

    def forget_unfinished(self, model: str, version: str, *, reason: str) -> int:
        """Undo what a run wrote here for `version` when the run failed before the version appeared:
        its consumption record is removed (a version that does not exist trained on nothing) and the
        rows it held (screening or the gate) are released with `reason`, so the next run judges them
        again. Returns how many rows were released. Only for a version whose folder never appeared."""
        self.discard_unfinished(model, version)
        return self.mark(model, self.held_by(model, version), "release", reason=reason, actor="rollback", version=version)
