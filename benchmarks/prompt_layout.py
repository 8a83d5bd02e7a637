"""Prompt layout: does naming the artifact type right before `### Output:` (layout 2) let the loop learn
every type, where layout 1 (the type in the first line only) swapped types from night to night?

Side by side in one run: for each seed, two fresh states, one per layout (`INCREMENTAL_PROMPT_LAYOUT`,
the setting a new lineage starts from), get the identical clean nights through the real `retrain`
flow with the default run config (the demo's two days of 80 rows, then nights of 60). After each
night the current version generates greedily for fresh notes of each type (a seed no feedback row was
drawn from), scored with `incremental.quality` as the demo scores them. Writes its table into
BENCHMARKS.md and every night to benchmarks/results/prompt_layout.csv.

    INCREMENTAL_THREADS=1 .venv/bin/python benchmarks/prompt_layout.py [--seeds 3] [--nights 5] [--per-type 15]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_block  # noqa: E402
from benchmarks.state import point_at  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from incremental.config import RunConfig  # noqa: E402
from incremental.feedback import FeedbackStore  # noqa: E402
from incremental.prompting import ARTIFACT_TYPES, PROMPT_LAYOUTS  # noqa: E402
from incremental.registry import Registry  # noqa: E402
from incremental.synthetic import synthetic_feedback  # noqa: E402

MODEL = "tiny"
FRESH_SEED = 9090  # no feedback row is drawn from it
FIELDS = ["seed", "layout", "night", "status", "version", *(f"{t}_{m}" for t in (*ARTIFACT_TYPES, "all") for m in ("valid", "f1"))]


def night_rows(seed: int, night: int) -> tuple[int, int]:
    """(rows, feedback seed) of one night: the demo's two days of 80, then 60 a night."""
    rows = 80 if night <= 2 else 60
    return rows, 1000 * (seed + 1) + night


def run_arm(seed: int, layout: int, nights: int, per_type: int, scratch: Path) -> list[dict]:
    """One state in one prompt layout, `nights` clean nights; the current version's quality after each."""
    from flows.retrain import retrain
    from incremental.quality import fresh_cases, quality_by_type
    from incremental.serving import load_model
    from incremental.settings import Settings

    folder = scratch / f"seed{seed}-layout{layout}"
    folder.mkdir()
    point_at(folder, MODEL, prompt_layout=str(layout))
    store = FeedbackStore(folder / "feedback.duckdb")
    store.init()
    cases = fresh_cases(per_type, FRESH_SEED)
    records = []
    for night in range(1, nights + 1):
        rows, feedback_seed = night_rows(seed, night)
        store.add_many([{**row, "id": f"n{night}-{i:03d}"} for i, row in enumerate(synthetic_feedback(rows, feedback_seed, model=MODEL))])
        summary = retrain(model=MODEL, config=RunConfig())
        current = Registry(folder / "finetuned_models", MODEL).current()
        loaded = load_model(MODEL, Settings(), version=current)
        assert loaded.prompt_layout == layout, (loaded.prompt_layout, layout)
        quality = quality_by_type(loaded.model, loaded.tokenizer, cases, prompt_layout=loaded.prompt_layout, batch_size=32)
        record = {"seed": seed, "layout": layout, "night": night, "status": summary.status, "version": current}
        for name, q in quality.items():
            record[f"{name}_valid"], record[f"{name}_f1"] = round(q.validity, 3), round(q.content_f1, 3)
        records.append(record)
        print(record, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return records


def table(records: list[dict], nights: int) -> list[str]:
    """Median over seeds, per layout and night: validity per type (and all), content F1 over all types."""
    lines = [
        "| night | layout | accepted | erd valid | api valid | prototype valid | all valid | min type valid | all content F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for night in range(1, nights + 1):
        for layout in PROMPT_LAYOUTS:
            rows = [r for r in records if r["night"] == night and r["layout"] == layout]
            if not rows:
                continue

            def median(key: str) -> str:
                return f"{statistics.median(r[key] for r in rows):.2f}"

            weakest = statistics.median(min(r[f"{t}_valid"] for t in ARTIFACT_TYPES) for r in rows)
            accepted = sum(r["status"] == "accepted" for r in rows)
            lines.append(
                f"| {night} | {layout} | {accepted}/{len(rows)} | {median('erd_valid')} | {median('api_valid')} | "
                f"{median('prototype_valid')} | {median('all_valid')} | {weakest:.2f} | {median('all_f1')} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nights", type=int, default=5)
    parser.add_argument("--per-type", type=int, default=15, help="fresh notes per artifact type scored each night")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="prompt-layout-") as scratch:
        for seed in range(args.seeds):
            for layout in PROMPT_LAYOUTS:
                records += run_arm(seed, layout, args.nights, args.per_type, Path(scratch))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "prompt_layout.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(records)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    per_seed = [
        f"seed {seed}: " + ", ".join(
            f"layout {layout} " + "/".join(f"{r[f'{t}_valid']:.2f}" for t in ARTIFACT_TYPES)
            for layout in PROMPT_LAYOUTS for r in records if r["seed"] == seed and r["layout"] == layout and r["night"] == 3
        )
        for seed in range(args.seeds)
    ]  # fmt: skip
    text = "\n".join(
        [
            "## Prompt layout: naming the artifact type right before the output",
            "",
            f"Command: `INCREMENTAL_THREADS=1 .venv/bin/python benchmarks/prompt_layout.py --seeds {args.seeds} --nights "
            f"{args.nights} --per-type {args.per_type}` (commit {commit})  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{time.perf_counter() - started:.0f} s in all. Per-night rows: `benchmarks/results/prompt_layout.csv`.",
            "",
            f"Per seed, two fresh states get the identical clean nights (80, 80, then 60 rows) through the real flow "
            f"with the default run config; they differ only in `INCREMENTAL_PROMPT_LAYOUT` (layout 1: `### Task:` in the "
            f"first line only; layout 2: after the notes, right before `### Output:`). After each night the current "
            f"version generates greedily for {args.per_type} fresh notes per type. Medians over {args.seeds} seeds; "
            "\"min type valid\" is the median of each state's weakest type:",
            "",
            *table(records, args.nights),
            "",
            "Night 3 validity erd/api/prototype per seed: " + "; ".join(per_seed) + ".",
        ]
    )
    print(text)
    if not args.no_write:
        write_block("prompt_layout", text)


if __name__ == "__main__":
    main()
