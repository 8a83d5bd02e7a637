"""`incremental generate`, `incremental rate`, `incremental serve-model`: use the current version.

`generate` and `serve-model` import the model stack inside the command (seconds); `rate` needs only
the feedback store. The shared helpers of `cli.main` are imported inside the commands too: cli.main
imports this module at its bottom, so a module-level import of it here would be circular.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from incremental.feedback.ingest import NO_RATER

# The same options as cli.main's ModelOption, JsonOption and RaterOption (see the docstring for why they are not imported).
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Model name (default: INCREMENTAL_MODEL).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts instead of text.")]
RaterOption = Annotated[
    str | None,
    typer.Option("--rater", help=f"Who rated it (default: INCREMENTAL_RATER, else your login name; {NO_RATER!r}: not known)."),
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `incremental` app."""
    app.command()(generate)
    app.command()(rate)
    app.command("serve-model")(serve_model)


def generate(
    artifact: Annotated[str, typer.Option("--artifact", "-a", help="erd | api | prototype")],
    notes: Annotated[Path, typer.Option(metavar="FILE", help="File with the meeting notes.", exists=True, dir_okay=False)],
    version: Annotated[
        str | None, typer.Option(help="Version to load instead of the current one ('base': the base model alone).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    model: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate an artifact from meeting notes with the current version, print it and record it for `rate`."""
    from cli.main import (
        CliInputError,
        _context,
        _print_json,
        _read_field,
        _safe,
        _store,
        console,
    )
    from incremental.prompting import ARTIFACT_TYPES

    settings, model = _context(model)
    if artifact not in ARTIFACT_TYPES:  # before the model stack loads: answered at once
        raise CliInputError(f"--artifact {artifact!r}: use one of {', '.join(ARTIFACT_TYPES)}")
    text = _read_field("--notes", notes)
    store = _store(settings)
    from incremental.serving import Generator

    generator = Generator(model, settings, version=version, follow=False, store=store)
    generation = generator.generate(artifact, text, max_new_tokens=max_new_tokens)
    if as_json:
        _print_json(
            {
                "id": generation.id, "model": generation.model, "version": generation.version,
                "artifact_type": generation.artifact_type, "output": generation.output, "decoding": generation.decoding,
                "created_at": generation.created_at,
            }
        )  # fmt: skip
        return
    console.print(_safe(generation.output), soft_wrap=True, highlight=False)
    console.print(
        f"[dim]Generation {generation.id} by {_safe(generation.version or 'the base model')}; rate it: "
        f"incremental rate {generation.id} --good | --needs-improvement [--correction FILE] [--rater NAME][/]",
        soft_wrap=True,
    )


def rate(
    generation_id: Annotated[str, typer.Argument(help="The id `incremental generate` printed.")],
    good: Annotated[bool, typer.Option("--good", help="The artifact is good.")] = False,
    needs_improvement: Annotated[bool, typer.Option("--needs-improvement", help="The artifact needs improvement.")] = False,
    correction: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="File with the corrected artifact (with --needs-improvement).", exists=True, dir_okay=False
        ),
    ] = None,
    rater: RaterOption = None,
) -> None:
    """Rate a recorded generation; the feedback row gets its notes, output, the version that produced it and who rated it."""
    from cli.main import CliInputError, _context, _rated_by, _rater, _rater_named, _read_field, _safe, _store, console

    if good == needs_improvement:
        raise CliInputError("pass exactly one of --good and --needs-improvement")
    if correction is not None and good:
        raise CliInputError("--correction goes with --needs-improvement (a good artifact needs none)")
    settings, _ = _context(None)
    rater, rater_source = _rater(rater, settings)
    fixed = _read_field("--correction", correction) if correction is not None else None
    store = _store(settings)
    generation = store.generation(generation_id)  # an unknown id is refused naming where ids come from
    rating = "good" if good else "needs_improvement"
    with _rater_named(rater_source):
        feedback_id = store.rate(generation.id, rating, correction=fixed, source="cli", rater=rater)
    console.print(
        f"Stored feedback {_safe(feedback_id)} ({rating}) for {_safe(generation.model)}, generated by "
        f"{_safe(generation.version or 'the base model')}{_rated_by(rater)}."
    )


def serve_model(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Serve whatever version a promotion or rollback makes current.")
    ] = True,
    model: ModelOption = None,
) -> None:
    """Serve POST /generate, POST /rate and GET /health over HTTP (JSON) with the current version."""
    from cli.main import CliInputError, _context, _safe, _store, console

    settings, model = _context(model)
    store = _store(settings)
    from incremental.http_api import make_server
    from incremental.serving import Generator

    generator = Generator(model, settings, follow=follow, store=store)
    try:
        server = make_server(generator, host, port)
    except OSError as error:
        raise CliInputError(
            f"--host {host} --port {port}: cannot listen there ({error.strerror}); pick another port or host"
        ) from None
    bound_host, bound_port = server.server_address[:2]
    console.print(
        f"Serving {_safe(model)} ({_safe(generator.version or 'the base model')}"
        f"{', following promotions' if follow else ''}) on http://{bound_host}:{bound_port} "
        "(POST /generate, POST /rate, GET /health); Ctrl+C stops it."
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
