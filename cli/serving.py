"""`incremental generate`, `incremental rate`, `incremental serve-model`: use the current version."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `incremental` app."""
