"""What the served model generated, and ratings that point at it.

An app (or `incremental generate`) records each generation: the notes, the artifact, the version
that produced it and how it decoded. Rating it later takes only its id (and who rates it): the
feedback row gets the generation's notes and output and `generated_by` = its version, so nobody
copies text by hand and every manifest can say which version's outputs it learned from.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from incremental.errors import IncrementalError
from incremental.feedback.database import check_model, utcnow
from incremental.feedback.ingest import FeedbackIngest, FeedbackInput
from incremental.layout import VERSION_NAME
from incremental.prompting import ARTIFACT_TYPES

RATINGS = ("good", "needs_improvement")
RATE_SOURCE = "rate"


class UnknownGenerationError(IncrementalError, LookupError):
    """No generation with that id is recorded for this feedback database."""


class AlreadyRatedError(IncrementalError):
    """The generation has a rating already; feedback rows are never edited."""


def new_generation_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Generation:
    """One artifact the model generated from meeting notes, as recorded for rating."""

    model: str
    version: str | None  # the version that produced it; None: the base model (Base Mode)
    artifact_type: str
    notes: str
    output: str
    decoding: dict[str, Any] = field(default_factory=dict)  # max_new_tokens, do_sample, ...
    id: str = field(default_factory=new_generation_id)
    created_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        check_model(self.model)
        if self.version is not None and not VERSION_NAME.match(self.version):
            raise ValueError(f"generation version {self.version!r} is not a version name; use vN_YYYYMMDD_HHMMSS or None (base)")
        if self.artifact_type not in ARTIFACT_TYPES:
            raise ValueError(f"artifact_type {self.artifact_type!r}: use one of {', '.join(ARTIFACT_TYPES)}")


class Generations(FeedbackIngest):
    """Recording generations and rating them (one rating each)."""

    def record_generation(self, generation: Generation) -> None:
        """Store one generation (one short write: serving records every request)."""
        with self._write() as con:
            con.execute(
                "INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    generation.id, generation.model, generation.version, generation.artifact_type,
                    generation.notes, generation.output, json.dumps(generation.decoding, sort_keys=True),
                    generation.created_at,
                ],
            )

    def generation(self, generation_id: str) -> Generation:
        """The recorded generation; UnknownGenerationError names the id and where to find ids."""
        with self._read() as con:
            rows = con.execute(
                "SELECT id, model, version, artifact_type, notes, output, decoding, created_at FROM generations WHERE id = ?",
                [generation_id],
            ).fetchall()
        if not rows:
            raise UnknownGenerationError(
                f"generation {generation_id!r} is not recorded in {self.path}; use the id `incremental generate` printed "
                "(or the `id` field the HTTP endpoint returned), with the same INCREMENTAL_DB_PATH"
            )
        return _generation(rows[0])

    def recent_generations(self, model: str, limit: int = 20) -> list[Generation]:
        """The model's latest generations, newest first."""
        check_model(model)
        with self._read() as con:
            rows = con.execute(
                "SELECT id, model, version, artifact_type, notes, output, decoding, created_at FROM generations "
                "WHERE model = ? ORDER BY created_at DESC, id LIMIT ?",
                [model, limit],
            ).fetchall()
        return [_generation(row) for row in rows]

    def rate(
        self,
        generation_id: str,
        rating: str,
        *,
        correction: str | None = None,
        source: str = RATE_SOURCE,
        rater: str | None = None,
    ) -> str:
        """Store the rating of a recorded generation as one feedback row and return its id (the
        generation's id): its notes, its output, `generated_by` = the version that produced it, and
        `rater` = who rated it (None: not known; checked like any row's rater).

        The row then goes through the same checks, screening and holds as any other feedback. A
        second rating of the same generation is refused: feedback rows are never edited.
        """
        if rating not in RATINGS:
            raise ValueError(f"rating {rating!r}: use one of {', '.join(RATINGS)}")
        if correction is not None and rating != "needs_improvement":
            raise ValueError("a correction goes with rating 'needs_improvement' (a good output needs none)")
        generation = self.generation(generation_id)
        with self._read() as con:
            rated = con.execute("SELECT rating FROM feedback WHERE id = ?", [generation.id]).fetchall()
        if rated:
            raise AlreadyRatedError(
                f"generation {generation.id} is already rated {rated[0][0]!r}; feedback rows are never edited: "
                f"exclude that rating with `incremental feedback exclude --ids {generation.id}` and add the new one with "
                "`incremental feedback add`"
            )
        return self.add(
            FeedbackInput(
                id=generation.id,
                model=generation.model,
                artifact_type=generation.artifact_type,
                prompt=generation.notes,
                output=generation.output,
                rating=rating,
                correction=correction,
                source=source,
                generated_by=generation.version,
                rater=rater,
            )
        )


def _generation(row: tuple) -> Generation:
    id_, model, version, artifact_type, notes, output, decoding, created_at = row
    return Generation(
        id=id_, model=model, version=version, artifact_type=artifact_type, notes=notes, output=output,
        decoding=json.loads(decoding) if isinstance(decoding, str) else dict(decoding), created_at=created_at,
    )
