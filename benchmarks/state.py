"""What the benchmarks read back from a state folder (a feedback DuckDB file and a version tree)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from incremental.registry import Registry


def trainable_train_rows(folder: Path, ids: list[str]) -> set[str]:
    """The rows of `ids` a version can train on: train split, rated good or corrected."""
    with duckdb.connect(str(folder / "feedback.duckdb"), read_only=True) as con:
        found = con.execute(
            "SELECT id FROM feedback WHERE id IN (SELECT unnest(?::VARCHAR[])) AND split = 'train' "
            "AND (rating = 'good' OR correction IS NOT NULL)",
            [ids],
        ).fetchall()
    return {row_id for (row_id,) in found}


def learned_by_current(folder: Path, model: str) -> set[str]:
    """Every row the current version's lineage trained on as new."""
    registry = Registry(folder / "finetuned_models", model)
    current = registry.current()
    return {row_id for name in (registry.lineage(current) if current else []) for row_id in registry.get(name).manifest.data.new_ids}
