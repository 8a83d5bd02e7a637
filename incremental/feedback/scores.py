"""The parent-score cache: per-example scores of finished versions, so a gate scores the parent only on rows it has not seen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from incremental.feedback.database import UTC_TIMESTAMP, FeedbackDatabase, check_model, utcnow
from incremental.layout import VERSION_NAME


class ScoreCache(FeedbackDatabase):
    """Scores keyed by (model, version, scorer settings, example content hash); pure, so never invalidated."""

    def cached_scores(self, model: str, version: str, scorer: str, hashes: Sequence[str]) -> dict[str, tuple]:
        """{example_hash: (nll_sum, n_tokens, text)} for the hashes `version` was already scored on by `scorer`."""
        check_model(model)
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
        check_model(model)
        if not VERSION_NAME.match(version):
            raise ValueError(f"version {version!r} is not a version name; only finished versions' scores are cached")
        if not entries:
            return
        now = utcnow()
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
                 ("nll_sum", pa.float64()), ("n_tokens", pa.int64()), ("text", pa.string()), ("scored_at", UTC_TIMESTAMP)]
            ),
        )  # fmt: skip
        with self._write() as con:
            con.register("incoming_scores", table)
            try:
                con.execute("INSERT INTO score_cache SELECT * FROM incoming_scores ON CONFLICT DO NOTHING")
            finally:
                con.unregister("incoming_scores")
