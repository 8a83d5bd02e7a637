"""`incremental report`: the version history as a self-contained HTML page and a PNG chart."""

# No `from __future__ import annotations`: typer reads the command's annotations, which name options
# imported inside `register` (cli.main imports this module), so they must be evaluated where they stand.
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `incremental` app."""
    from cli.main import JsonOption, ModelOption  # here: cli.main imports this module

    @app.command()
    def report(
        model: ModelOption = None,
        out: Annotated[
            Optional[Path],
            typer.Option(metavar="DIR", help="Folder to write history.html and history.png into (default: reports/<model>/ beside the feedback database)."),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """The history as a page and a chart: lineage tree with rollbacks, verdicts with intervals, data per version, held and excluded rows."""
        from cli.main import CliInputError, _context, _print_json, _safe, _store, console
        from incremental.history_report import default_report_dir, gather_history, write_report
        from incremental.registry import Registry

        settings, model = _context(model)
        if out is not None and out.exists() and not out.is_dir():
            raise CliInputError(f"--out {out}: is a file, not a folder; give the folder to write history.html and history.png into")
        # No database yet: the page says so; a report never creates one.
        store = _store(settings) if settings.db_path.is_file() else None
        history = gather_history(Registry(settings.models_root, model), store)
        files = write_report(history, out if out is not None else default_report_dir(settings.db_path, model))
        if as_json:
            _print_json(
                {
                    "model": model, "html": str(files.html), "png": str(files.png), "current": history.current,
                    "versions": len(history.versions), "report": history.to_record(),
                }
            )  # fmt: skip
            return
        console.print(
            f"History of {_safe(model)} ({len(history.versions)} versions, current {_safe(history.current or 'base model')}):\n"
            f"  page:  {_safe(str(files.html))}\n  chart: {_safe(str(files.png))}",
            soft_wrap=True,
        )
