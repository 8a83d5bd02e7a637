"""A benchmark state folder (a feedback DuckDB file and a version tree): pointing the settings at it, and what the
benchmarks read back from it."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from incremental.registry import Registry


def point_at(folder: Path, model: str, **settings: str) -> None:
    """Point the settings (read by the flow at each run) at one state folder, on the embedded base;
    `settings` sets further INCREMENTAL_* variables (prompt_layout="1" sets INCREMENTAL_PROMPT_LAYOUT)."""
    os.environ["INCREMENTAL_DB_PATH"] = str(folder / "feedback.duckdb")
    os.environ["INCREMENTAL_MODELS_ROOT"] = str(folder / "finetuned_models")
    os.environ["INCREMENTAL_MODEL"] = model
    os.environ["INCREMENTAL_BASE_MODEL"] = "embedded"
    for name, value in settings.items():
        os.environ[f"INCREMENTAL_{name.upper()}"] = value


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
