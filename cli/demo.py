"""`incremental demo`: the whole story on the embedded tiny model, on a laptop CPU.

Day 1 seeds feedback and trains v1 from the base model; day 2 adds feedback and v2 builds on v1;
day 3 a poisoned batch (outputs swapped between meeting notes) makes v3, which the gate rejects;
day 4 rolls back to v1 and v4 builds on it. Ends with the version table and the wall time.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from incremental.config import RunConfig
from incremental.feedback import FeedbackStore
from incremental.registry import Registry
from incremental.reporting import RunSummary, version_table
from incremental.settings import Settings
from incremental.synthetic import synthetic_feedback

DEMO_MODEL = "tiny"
# Feedback per day: (rows, seed, poisoned)
DAY1, DAY2, DAY3_POISON, DAY4 = (80, 101, False), (80, 202, False), (80, 303, True), (60, 404, False)


def run_demo(workdir: Path, console: Console, seed: int = 0) -> list[RunSummary]:
    """The story; `seed` shifts every day's feedback (seed 0 is the README's story)."""
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
    demo_seed = seed
    summaries: list[RunSummary] = []

    def day(title: str, rows: int, day_seed: int, poisoned: bool) -> RunSummary:
        console.print(Rule(title))
        seed = day_seed + 1000 * demo_seed
        # Fixed ids: the train/eval split is a function of the id, so the story replays exactly.
        feedback = [
            {**row, "id": f"demo-{seed}-{i:03d}"}
            for i, row in enumerate(synthetic_feedback(rows, seed, model=DEMO_MODEL, poisoned=poisoned))
        ]
        store.add_many(feedback)
        kind = "poisoned rows (outputs swapped between meeting notes, all rated good)" if poisoned else "rated artifacts"
        console.print(f"Added {rows} {kind}.")
        summary = retrain(model=DEMO_MODEL, config=config)
        summaries.append(summary)
        colour = "green" if summary.status == "accepted" else "red"
        console.print(f"[bold {colour}]{summary.headline()}[/]")
        for reason in summary.reasons:
            console.print(f"  • {reason}")
        return summary

    v1 = day("Day 1: first feedback, base mode", *DAY1)
    v2 = day("Day 2: more feedback, v2 builds on v1", *DAY2)
    v3 = day("Day 3: a poisoned batch", *DAY3_POISON)
    console.print(f"Current version is still {registry.current()}.")

    console.print(Rule("Day 4: roll back to v1, then train again"))
    rollback = registry.rollback(v1.version, reason="demo: going back to v1")
    console.print(rollback.message)
    v4 = day("Day 4: new feedback, v4 builds on v1", *DAY4)

    from cli.main import render_version_table

    console.print(Rule("Versions"))
    console.print(render_version_table(version_table(registry), title=f"Versions of {DEMO_MODEL}"))
    console.print(f"History: {len(registry.history())} pointer moves in {registry.root / 'history.jsonl'}")
    console.print(f"Demo finished in {time.perf_counter() - started:.0f} s. Files are in {workdir}/.")
    rows, day_seed, _ = DAY3_POISON
    poisoned_ids = {f"demo-{day_seed + 1000 * seed}-{i:03d}" for i in range(rows)}
    v4_new = set(registry.get(v4.version).manifest.data.new_ids) if v4.version else set()
    held_now = set(store.held_by(DEMO_MODEL, v3.version)) if v3.version else set()
    console.print(
        f"Held after v3: {len(held_now)} rows of the poisoned batch; v4 trained on {len(v4_new & poisoned_ids)} of them."
    )
    _check_story(v1, v2, v3, v4, console, poisoned_in_v4=len(v4_new & poisoned_ids))
    return summaries


def _check_story(
    v1: RunSummary, v2: RunSummary, v3: RunSummary, v4: RunSummary, console: Console, poisoned_in_v4: int
) -> None:
    """Say plainly if the story did not go as told (a demo that lies is worse than none)."""
    problems = []
    if v1.status != "accepted":
        problems.append(f"v1 was {v1.status}, expected accepted")
    if v2.status != "accepted" or v2.parent != v1.version:
        problems.append(f"v2 was {v2.status} with parent {v2.parent}, expected accepted on {v1.version}")
    elif not (v2.candidate_scores["target_nll"] < v2.parent_scores["target_nll"]):
        problems.append("v2's eval NLL is not lower than v1's")
    if v3.status != "rejected":
        problems.append(f"the poisoned v3 was {v3.status}, expected rejected")
    if v4.parent != v1.version:
        problems.append(f"v4 builds on {v4.parent}, expected {v1.version}")
    if poisoned_in_v4:
        problems.append(f"v4 trained on {poisoned_in_v4} rows of the rejected poisoned batch, expected none (they are held)")
    if problems:
        console.print("[bold red]The demo did not go as told:[/] " + "; ".join(problems))
        raise SystemExit(1)
    console.print(
        "[bold green]Story checked:[/] v1 accepted, v2 better than v1 and accepted, poisoned v3 rejected and its batch held, "
        "v4 built on v1 from clean rows only."
    )
