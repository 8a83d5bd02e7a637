"""`incremental demo`: the whole story on the embedded tiny model, on a laptop CPU.

Day 1 seeds feedback and trains v1 from the base model; day 2 adds feedback and v2 builds on v1.
Day 3 a poisoned batch (outputs swapped between meeting notes, all rated good) is run with screening
off: the gate rejects v3 on the trusted rows and holds the batch. Day 3b another poisoned batch, with
the default config: screening holds it before anything trains. Day 4 rolls back to v1 and v4 builds on
it from clean rows only. Ends with the version table, what each accepted version generates on fresh
meeting notes (also written to `quality.json` in the demo's folder) and the wall time.

Its output is the story; `incremental demo` keeps the machinery's lines off the terminal (cli/main.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from incremental.config import RunConfig, ScreeningPolicy
from incremental.feedback import FeedbackStore
from incremental.quality import TypeQuality
from incremental.registry import Registry
from incremental.reporting import RunSummary, version_table
from incremental.settings import Settings
from incremental.synthetic import synthetic_feedback

DEMO_MODEL = "tiny"
# Feedback per day: (rows, seed, poisoned)
DAY1, DAY2, DAY3_POISON, DAY3B_POISON, DAY4 = (80, 101, False), (80, 202, False), (80, 303, True), (80, 313, True), (60, 404, False)
# Fresh notes per artifact type for the quality table: 10 keep it to about 15 s for four models on a
# 2-core laptop (a share moves in steps of 0.1). Their seed is one no day draws its feedback from.
QUALITY_PER_TYPE = 10
QUALITY_SEED = 9000
QUALITY_FILE = "quality.json"


def day_ids(day: tuple[int, int, bool], demo_seed: int) -> list[str]:
    """Fixed ids: the train/eval split is a function of the id, so the story replays exactly."""
    rows, day_seed, _ = day
    return [f"demo-{day_seed + 1000 * demo_seed}-{i:03d}" for i in range(rows)]


def run_demo(workdir: Path, console: Console, seed: int = 0) -> list[RunSummary]:
    """The story; `seed` shifts every day's feedback (seed 0 is the README's story).

    Returns the runs of days 1, 2, 3, 3b and 4; the quality table's numbers are in `workdir/quality.json`.
    """
    started = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    # The demo's own feedback file and version tree; the embedded base stays in the shared cache.
    os.environ["INCREMENTAL_DB_PATH"] = str(workdir / "feedback.duckdb")
    os.environ["INCREMENTAL_MODELS_ROOT"] = str(workdir / "finetuned_models")
    os.environ["INCREMENTAL_MODEL"] = DEMO_MODEL
    os.environ["INCREMENTAL_BASE_MODEL"] = "embedded"  # the demo is the embedded default
    settings = Settings()
    store = FeedbackStore(settings.db_path)
    store.init()
    registry = Registry(settings.models_root, DEMO_MODEL)

    from flows.retrain import retrain  # imported late: Prefect and torch take seconds to import

    config = RunConfig()  # the defaults, as a nightly deployment would run
    unscreened = config.model_copy(update={"gate": config.gate.model_copy(update={"screening": ScreeningPolicy(enabled=False)})})
    summaries: list[RunSummary] = []

    def day(title: str, spec: tuple[int, int, bool], run_config: RunConfig = config) -> RunSummary:
        console.print(Rule(title))
        rows, day_seed, poisoned = spec
        generated = synthetic_feedback(rows, day_seed + 1000 * seed, model=DEMO_MODEL, poisoned=poisoned)
        store.add_many([{**row, "id": row_id} for row, row_id in zip(generated, day_ids(spec, seed))])
        kind = "poisoned rows (outputs swapped between meeting notes, all rated good)" if poisoned else "rated artifacts"
        console.print(f"Added {rows} {kind}.")
        summary = retrain(model=DEMO_MODEL, config=run_config)
        summaries.append(summary)
        colour = {"accepted": "green", "rejected": "red"}.get(summary.status, "yellow")
        console.print(f"[bold {colour}]{escape(summary.headline())}[/]")
        for reason in summary.reasons[:3]:
            console.print(f"  • {escape(reason)}")
        if summary.n_screened:
            console.print(f"  Screening held {summary.n_screened} rows of the batch before training.")
        if summary.n_held:
            console.print(f"  The gate held the {summary.n_held} rows of the rejected batch until a person releases them.")
        return summary

    v1 = day("Day 1: first feedback, base mode", DAY1)
    v2 = day("Day 2: more feedback, v2 builds on v1", DAY2)
    v3 = day("Day 3: a poisoned batch, run with screening off: the gate alone", DAY3_POISON, unscreened)
    console.print(f"Current version is still {registry.current()}.")
    v3b = day("Day 3b: another poisoned batch, default config: screening first", DAY3B_POISON)

    console.print(Rule("Day 4: roll back to v1, then train again"))
    rollback = registry.rollback(v1.version, reason="demo: going back to v1")
    console.print(escape(rollback.message))
    v4 = day("Day 4: new feedback, v4 builds on v1", DAY4)

    from cli.main import render_version_table

    console.print(Rule("Versions"))
    console.print(render_version_table(version_table(registry), title=f"Versions of {DEMO_MODEL}"))
    console.print(f"History: {len(registry.history())} pointer moves in {escape(str(registry.root / 'history.jsonl'))}")
    held = {mark.feedback_id for mark in store.marks(DEMO_MODEL) if mark.action == "hold"}
    poisoned = set(day_ids(DAY3_POISON, seed)) | set(day_ids(DAY3B_POISON, seed))
    v4_data = registry.get(v4.version).manifest.data if v4.version else None
    trained_poison = poisoned & (set(v4_data.new_ids) | set(v4_data.replay_ids)) if v4_data else set()
    console.print(
        f"Held: {len(held & poisoned)} of the {len(poisoned)} poisoned rows (see `incremental feedback held`); "
        f"v4 trained on {len(trained_poison)} of them."
    )
    quality_started = time.perf_counter()
    quality = served_quality(registry, settings, QUALITY_PER_TYPE, QUALITY_SEED + seed)
    quality_seconds = time.perf_counter() - quality_started
    console.print(Rule("What users receive"))
    console.print(quality_table(quality, QUALITY_PER_TYPE))
    record = {
        "per_type": QUALITY_PER_TYPE,
        "seed": QUALITY_SEED + seed,
        "seconds": round(quality_seconds, 1),
        "versions": {name: {t: dataclasses.asdict(q) for t, q in by_type.items()} for name, by_type in quality.items()},
    }
    (workdir / QUALITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    console.print(
        f"Demo finished in {time.perf_counter() - started:.0f} s ({quality_seconds:.0f} s of it for the quality table). "
        f"Files are in {escape(str(workdir))}/."
    )
    _check_story(v1, v2, v3, v3b, v4, console, unheld=len(poisoned - held), trained_poison=len(trained_poison))
    return summaries


def served_quality(registry: Registry, settings: Settings, per_type: int, seed: int) -> dict[str, dict[str, TypeQuality]]:
    """{'base' and each accepted version, oldest first: {artifact type or 'all': quality}} of greedy
    generations on `per_type` fresh meeting notes per type, each version loaded as serving loads it."""
    from incremental.quality import fresh_cases, quality_by_type
    from incremental.serving import BASE, load_model
    from incremental.threads import apply_threads

    apply_threads(settings)  # the flow's tasks set it in their own threads; this generates in the caller's
    cases = fresh_cases(per_type, seed)
    accepted = [info.name for info in registry.versions() if info.manifest is not None and info.manifest.status == "accepted"]
    quality = {}
    for name in [BASE, *accepted]:
        loaded = load_model(registry.model, settings, version=name)
        quality[name] = quality_by_type(loaded.model, loaded.tokenizer, cases, prompt_layout=loaded.prompt_layout)
    return quality


def quality_table(quality: dict[str, dict[str, TypeQuality]], per_type: int) -> Table:
    """Rows: versions; columns: validity and content F1 per artifact type and over all types."""
    table = Table(
        title=f"What users receive: greedy generations on {per_type} fresh meeting notes per type",
        caption="valid: share that parses as its type; F1: the names it declares against the right artifact's",
    )
    types = list(next(iter(quality.values())))  # the artifact types in their fixed order, then 'all'
    table.add_column("version")
    for artifact_type in types:
        label = "overall" if artifact_type == "all" else artifact_type
        table.add_column(f"{label} valid", justify="right")
        table.add_column(f"{label} F1", justify="right")
    for name, by_type in quality.items():
        cells = []
        for artifact_type in types:
            cells += [f"{by_type[artifact_type].validity:.0%}", f"{by_type[artifact_type].content_f1:.2f}"]
        table.add_row(escape(name), *cells)
    return table


def _check_story(
    v1: RunSummary, v2: RunSummary, v3: RunSummary, v3b: RunSummary, v4: RunSummary, console: Console, *,
    unheld: int, trained_poison: int,
) -> None:
    """Say plainly if the story did not go as told (a demo that lies is worse than none)."""
    problems = []
    if v1.status != "accepted":
        problems.append(f"v1 was {v1.status}, expected accepted")
    if v2.status != "accepted" or v2.parent != v1.version:
        problems.append(f"v2 was {v2.status} with parent {v2.parent}, expected accepted on {v1.version}")
    elif not (v2.candidate_scores["target_nll"] < v2.parent_scores["target_nll"]):
        problems.append("v2's NLL on trusted rows is not lower than v1's")
    if v3.status != "rejected":
        problems.append(f"the poisoned v3 was {v3.status}, expected rejected by the gate")
    if v3b.status != "skipped":
        problems.append(f"the second poisoned batch was {v3b.status}, expected held by screening (skipped)")
    if v4.parent != v1.version:
        problems.append(f"v4 builds on {v4.parent}, expected {v1.version}")
    if unheld:
        problems.append(f"{unheld} poisoned rows are not held")
    if trained_poison:
        problems.append(f"v4 trained on {trained_poison} poisoned rows, expected none")
    if problems:
        console.print("[bold red]The demo did not go as told:[/] " + "; ".join(problems))
        raise SystemExit(1)
    console.print(
        "[bold green]Story checked:[/] v1 accepted, v2 better than v1 and accepted, poisoned v3 rejected by the gate and "
        "its batch held, the next poisoned batch held by screening, v4 built on v1 from clean rows only."
    )
