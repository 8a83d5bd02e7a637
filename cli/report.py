"""`incremental report`: the version history as a self-contained HTML page and a PNG chart."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `incremental` app."""
