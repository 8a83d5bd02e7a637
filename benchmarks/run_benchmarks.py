"""Side-by-side measurements, written into BENCHMARKS.md with the command and the machine.

collect: the feedback store's DuckDB -> Arrow path (what the flow uses) against the same query
fetched as Python rows and turned into dicts (the obvious hand-written baseline), then wrapped as a
`datasets.Dataset` either way. Reports medians over repeats and the ratio; run on a quiet machine.

    .venv/bin/python benchmarks/run_benchmarks.py [--rows 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import duckdb  # noqa: E402

from incremental.feedback import FeedbackStore  # noqa: E402
from incremental.synthetic import synthetic_feedback  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_collect(rows: int, repeats: int) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        store = FeedbackStore(Path(scratch) / "bench.duckdb")
        store.init()
        store.add_many(synthetic_feedback(rows, 7, model="bench"))

        def arrow_path():
            collected = store.collect("bench", ())
            return datasets.Dataset(collected.new)

        def python_rows_baseline():
            con = duckdb.connect(str(store.path), read_only=True)
            try:
                cursor = con.execute(
                    "SELECT id, artifact_type, prompt, COALESCE(correction, output) AS target FROM feedback "
                    "WHERE model = 'bench' AND split = 'train' AND (rating = 'good' OR correction IS NOT NULL) "
                    "ORDER BY created_at, id"
                )
                names = [d[0] for d in cursor.description]
                records = [dict(zip(names, row)) for row in cursor.fetchall()]
            finally:
                con.close()
            return datasets.Dataset.from_list(records)

        assert len(arrow_path()) == len(python_rows_baseline())
        arrow = median_seconds(arrow_path, repeats)
        baseline = median_seconds(python_rows_baseline, repeats)
    return [
        f"| collect {rows:,} rows → datasets.Dataset | DuckDB → Arrow (store.collect) | {arrow * 1000:.0f} ms |",
        f"| | baseline: Python rows → dicts → Dataset.from_list | {baseline * 1000:.0f} ms |",
        f"| | ratio (baseline / Arrow) | {baseline / arrow:.1f}× |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lines = bench_collect(args.rows, args.repeats)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    report = "\n".join(
        [
            "# Benchmarks",
            "",
            f"Command: `.venv/bin/python benchmarks/run_benchmarks.py --rows {args.rows} --repeats {args.repeats}`",
            f"Machine: {machine}. Medians of {args.repeats} repeats; shared machines are noisy, read the ratios.",
            "",
            "store.collect does more than the baseline: it classifies every row of the model into four",
            "buckets against the lineage and returns all columns; the baseline runs one narrow query.",
            "",
            "| what | path | median |",
            "|---|---|---|",
            *lines,
            "",
        ]
    )
    (ROOT / "BENCHMARKS.md").write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
