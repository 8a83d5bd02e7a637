"""`incremental export`: a version as a merged model for servers that take no adapters."""

# No `from __future__ import annotations`: typer reads the command's annotations, which name
# cli.main's ModelOption, imported inside `register`, so they must be evaluated where they are written.
from pathlib import Path
from typing import Annotated

import typer

from incremental.errors import IncrementalError


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `incremental` app."""
    # Here, not at import: cli.main imports this module near its end, once these names exist.
    from cli.main import CliInputError, ModelOption, _context, console

    @app.command("export")
    def export(
        version: Annotated[str, typer.Argument(help="The version to export, e.g. v3_20251105_160000.")],
        merged: Annotated[
            Path,
            typer.Option(
                "--merged",
                metavar="OUT",
                help="Folder to write the merged model into (base + adapter, safetensors, with the tokenizer).",
            ),
        ],
        model: ModelOption = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous export in the folder.")] = False,
    ) -> None:
        """Write a version merged into its base (float32 safetensors and tokenizer), loadable without PEFT."""
        # Here: cli.main defines _safe after it registers this command, and the export loads torch.
        from cli.main import _safe
        from incremental.export import export_merged

        settings, model = _context(model)
        try:
            result = export_merged(settings, model, version, merged, overwrite=overwrite)
        except IncrementalError:  # an unknown or damaged version, a missing base: already says what to do
            raise
        except ValueError as error:  # the folder cannot take the export; the message names the fix
            raise CliInputError(str(error)) from None
        note = " (trained on the 4-bit base; merged onto the unquantized base)" if result.unquantized_from_4bit else ""
        console.print(
            f"Exported {_safe(result.version)} merged into {_safe(result.base.id)} to {_safe(str(result.path))}{note}: "
            f"{len(result.files)} files."
        )
