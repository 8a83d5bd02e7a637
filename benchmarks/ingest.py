"""Bulk ingest and dataset building at scale, side by side with the obvious per-row Python paths.

(a) Importing a Parquet file of synthetic feedback (`--rows`, 1M by default): `store.import_file`
(DuckDB reads, checks every row in SQL and inserts in one transaction) against the previous
implementation: the file read into Python dicts, each row validated by a pydantic model, the split
computed per row in Python, then one insert (on `--baseline-rows` rows when given, its time then
extrapolated to `--rows`; the table says so).
(b) Building the train set from the database: the trainable train rows (id, artifact_type, prompt,
target) fetched as Arrow and wrapped as a `datasets.Dataset`, against the same query fetched as
Python tuples, turned into dicts and passed to `Dataset.from_list`; then the same with tokenization
(`dataset.tokenize_train`, max_length 512, a byte-level BPE trained in-process) on `--tokenize-rows`.

Every measurement runs in its own child process, so its peak RSS (ru_maxrss) is its own. Writes its
table into BENCHMARKS.md between the ingest markers.

    .venv/bin/python benchmarks/ingest.py [--rows 1000000] [--baseline-rows N] [--repeats 3] [--tokenize-rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_block  # noqa: E402

MODEL = "bench"
TRAIN_SQL = """
    SELECT id, artifact_type, prompt, coalesce(correction, output) AS target FROM feedback
    WHERE model = 'bench' AND split = 'train' AND (rating = 'good' OR correction IS NOT NULL)
    ORDER BY created_at, id
"""


# -- the input ----------------------------------------------------------------------------------


def child_write_parquet(path: str, rows: int) -> dict:
    """`rows` synthetic feedback rows: 2 000 distinct ones repeated, each with its own id and time.

    A child like the others: the parent stays small, because a child's ru_maxrss starts from its
    parent's resident size at the fork."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from incremental.synthetic import synthetic_feedback

    distinct = pa.Table.from_pylist(synthetic_feedback(2000, 7, model=MODEL))
    table = pa.concat_tables([distinct] * -(-rows // distinct.num_rows)).slice(0, rows).combine_chunks()
    numbers = pc.cast(pa.array(np.arange(rows)), pa.string())
    created = np.datetime64("2025-01-01T00:00:00", "s") + np.arange(rows).astype("timedelta64[s]")
    table = table.append_column("id", pc.binary_join_element_wise("row-", numbers, ""))
    table = table.append_column("created_at", pa.array(created).cast(pa.timestamp("us", tz="UTC")))
    pq.write_table(table, path, row_group_size=100_000)
    return {"seconds": 0.0, "rows": rows}


# -- what each child process measures ------------------------------------------------------------


def child_bulk_import(parquet: str, database: str) -> dict:
    from incremental.feedback import FeedbackStore

    store = FeedbackStore(Path(database))
    store.init()
    started = time.perf_counter()
    report = store.import_file(Path(parquet))
    return {"seconds": time.perf_counter() - started, "rows": report.stored}


def child_per_row_import(parquet: str, database: str, rows: int) -> dict:
    """The previous implementation: pydantic per row, the split per row in Python, one insert."""
    import uuid
    from datetime import UTC, datetime
    from typing import Any, Literal

    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

    from incremental.feedback import FeedbackStore, split_for
    from incremental.layout import MODEL_NAME, VERSION_NAME

    class FeedbackInput(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        model: str = Field(pattern=MODEL_NAME.pattern)
        artifact_type: Literal["erd", "api", "prototype"]
        prompt: str
        output: str
        rating: Literal["good", "needs_improvement"]
        correction: str | None = None
        source: str = Field("api", min_length=1)
        generated_by: str | None = Field(None, pattern=VERSION_NAME.pattern)
        created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
        id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^\S{1,128}$")

        @field_validator("prompt", "output")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("must not be empty or only whitespace")
            return value

        @field_validator("correction")
        @classmethod
        def _correction_fits_rating(cls, value: str | None, info: ValidationInfo) -> str | None:
            if value is not None and (not value.strip() or info.data.get("rating") == "good"):
                raise ValueError("correction does not fit")
            return value

        @field_validator("created_at")
        @classmethod
        def _as_utc(cls, value: datetime) -> datetime:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    store = FeedbackStore(Path(database))
    store.init()
    started = time.perf_counter()
    records = pq.read_table(parquet).slice(0, rows).to_pylist()
    parsed = []
    seen: set[str] = set()
    for record in records:
        item = FeedbackInput.model_validate({k: v for k, v in record.items() if v is not None or k == "correction"})
        assert item.id not in seen
        seen.add(item.id)
        parsed.append(item)
    now = datetime.now(UTC)
    names = ("id", "model", "artifact_type", "prompt", "output", "rating", "correction", "source", "generated_by", "created_at")
    columns: dict[str, list[Any]] = {name: [] for name in (*names, "split", "ingested_at")}
    for item in parsed:
        for name in names:
            columns[name].append(getattr(item, name))
        columns["split"].append(split_for(item.id, 0.2))
        columns["ingested_at"].append(now)
    utc = pa.timestamp("us", tz="UTC")
    incoming = pa.table(columns, schema=pa.schema([(n, utc if n in ("created_at", "ingested_at") else pa.string()) for n in columns]))
    con = duckdb.connect(database)
    con.register("incoming", incoming)
    taken = con.execute("SELECT count(*) FROM feedback JOIN incoming USING (id)").fetchall()[0][0]
    assert taken == 0
    con.execute(f"INSERT INTO feedback ({', '.join(columns)}) SELECT * FROM incoming")
    con.close()
    return {"seconds": time.perf_counter() - started, "rows": len(parsed)}


def small_tokenizer():
    """A byte-level BPE trained in-process on synthetic notes and artifacts (no hub, a second or two)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from incremental.synthetic import generate_cases

    cases = generate_cases(500, 11)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([c.notes for c in cases] + [c.artifact for c in cases], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def child_dataset(database: str, path: str, limit: int | None) -> dict:
    """The train set as a `datasets.Dataset` by one path; tokenized when `limit` is given (its rows).

    `arrow` leaves the fingerprint to `datasets`, which pickles and hashes the whole table (as
    `from_list` does); `arrow_ids` passes one hashed from the id column: stored rows never change,
    so their ids name their content.
    """
    import hashlib

    import datasets
    import duckdb

    from incremental.dataset import encode_examples, tokenize_train
    from incremental.prompting import LATEST_LAYOUT

    tokenizer = small_tokenizer() if limit else None
    sql = TRAIN_SQL + (f" LIMIT {limit}" if limit else "")
    started = time.perf_counter()
    con = duckdb.connect(database, read_only=True)
    if path in ("arrow", "arrow_ids"):
        table = con.sql(sql).to_arrow_table()
        con.close()
        fingerprint = None
        if path == "arrow_ids":
            row_ids = table.column("id").combine_chunks()
            fingerprint = hashlib.sha256(b"".join(bytes(b) for b in row_ids.buffers()[1:])).hexdigest()[:16]
        dataset = datasets.Dataset(table, fingerprint=fingerprint)
        if tokenizer is not None:
            dataset, _ = tokenize_train(table, tokenizer, max_length=512, prompt_layout=LATEST_LAYOUT)
    else:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        records = [dict(zip(names, values)) for values in cursor.fetchall()]
        con.close()
        dataset = datasets.Dataset.from_list(records)
        if tokenizer is not None:
            encoded = encode_examples(
                tokenizer, [r["artifact_type"] for r in records], [r["prompt"] for r in records], [r["target"] for r in records], 512,
                prompt_layout=LATEST_LAYOUT,
            )
            dataset = datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]})
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": len(dataset)}


def child_idle(kind: str) -> dict:
    """The same imports and nothing else: the floor under the peak RSS of a measurement."""
    if kind == "dataset":
        import datasets  # noqa: F401
        import duckdb  # noqa: F401
        import transformers  # noqa: F401

        import incremental.dataset  # noqa: F401
    else:
        import pydantic  # noqa: F401

        import incremental.feedback  # noqa: F401
    return {"seconds": 0.0, "rows": 0}


CHILDREN = {
    "write_parquet": child_write_parquet,
    "bulk_import": child_bulk_import,
    "per_row_import": child_per_row_import,
    "dataset": child_dataset,
    "idle": child_idle,
}


def run_child(task: str, *args: object) -> dict:
    """Run one measurement in a fresh interpreter; its result and peak RSS come back as JSON."""
    command = [sys.executable, __file__, "--child", task, json.dumps(list(args))]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{task} failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def child_main(task: str, args: str) -> None:
    result = CHILDREN[task](*json.loads(args))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(result))


# -- the report ---------------------------------------------------------------------------------


def median_run(repeats: int, task: str, *args: object) -> dict:
    runs = [run_child(task, *args) for _ in range(repeats)]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "rows": runs[0]["rows"],
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--baseline-rows", type=int, default=None, help="rows the per-row import runs on, extrapolated to --rows (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the dataset measurements (medians)")
    parser.add_argument("--tokenize-rows", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    baseline_rows = min(args.baseline_rows or args.rows, args.rows)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as scratch_name:
        scratch = Path(scratch_name)
        parquet = scratch / "feedback.parquet"
        run_child("write_parquet", str(parquet), args.rows)
        size_mb = parquet.stat().st_size / 2**20
        print(f"wrote {args.rows:,} rows to {parquet} ({size_mb:.0f} MiB)", flush=True)

        database = scratch / "bulk.duckdb"
        bulk = run_child("bulk_import", str(parquet), str(database))
        print("bulk import", bulk, flush=True)
        per_row = run_child("per_row_import", str(parquet), str(scratch / "per_row.duckdb"), baseline_rows)
        print("per-row import", per_row, flush=True)
        idle_import = run_child("idle", "import")

        built = {}
        for path in ("python", "arrow", "arrow_ids"):
            built[path] = median_run(args.repeats, "dataset", str(database), path, None)
            print(path, "dataset", built[path], flush=True)
        tokenized = {}
        for path in ("python", "arrow"):
            tokenized[path] = median_run(args.repeats, "dataset", str(database), path, args.tokenize_rows)
            print(path, "tokenized", tokenized[path], flush=True)
        idle_dataset = run_child("idle", "dataset")

    bulk_rate = bulk["rows"] / bulk["seconds"]
    per_row_rate = per_row["rows"] / per_row["seconds"]
    per_row_time = f"{per_row['seconds']:.1f} s"
    if baseline_rows < args.rows:
        per_row_time += f" for {baseline_rows:,} (≈ {args.rows / per_row_rate:.0f} s for {args.rows:,}, extrapolated)"

    def mb(value: float) -> str:
        return f"{value:,.0f} MB"

    def row(what: str, how: str, result: dict) -> str:
        return (
            f"| {what} | {how} | {result['rows']:,} | {result['seconds']:.2f} s | {result['rows'] / result['seconds']:,.0f} | "
            f"{mb(result['peak_rss_mb'])} |"
        )

    def ratio(baseline: dict, faster: dict, label: str) -> str:
        return f"| | {label} | | **{baseline['seconds'] / faster['seconds']:.1f}×** | | |"

    lines = [
        "## Bulk ingest and building the train set",
        "",
        f"Command: `.venv/bin/python benchmarks/ingest.py --rows {args.rows}"
        + (f" --baseline-rows {args.baseline_rows}" if args.baseline_rows else "")
        + f" --repeats {args.repeats} --tokenize-rows {args.tokenize_rows}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work (timings are noisy: read the "
        f"ratios), Python {platform.python_version()}; {time.perf_counter() - started:.0f} s in all. Input: "
        f"{args.rows:,} synthetic feedback rows (2,000 distinct ones repeated, each with its own id and time) in a "
        f"{size_mb:.0f} MiB Parquet file. Each measurement ran in a process of its own; its peak RSS includes the "
        f"interpreter and its imports (idle with the same imports: {mb(idle_import['peak_rss_mb'])} for (a), "
        f"{mb(idle_dataset['peak_rss_mb'])} for (b)).",
        "",
        "| what | path | rows | time | rows/s | peak RSS |",
        "|---|---|---|---|---|---|",
        row("(a) import a Parquet file", "`store.import_file`: DuckDB reads, one SQL rule set checks, one insert", bulk),
        f"| | previous: Python dicts, pydantic per row, split per row in Python, one insert | {per_row['rows']:,} | "
        f"{per_row_time} | {per_row_rate:,.0f} | {mb(per_row['peak_rss_mb'])} |",
        f"| | ratio (by rows/s) | | **{bulk_rate / per_row_rate:.1f}×** | | |",
        row("(b) train set → `datasets.Dataset`", "baseline: Python tuples → dicts → `Dataset.from_list`", built["python"]),
        row("", "DuckDB → Arrow → `Dataset(table)`", built["arrow"]),
        row("", "DuckDB → Arrow → `Dataset(table, fingerprint=<hash of the ids>)`", built["arrow_ids"]),
        ratio(built["python"], built["arrow"], "ratio (baseline / Arrow)"),
        ratio(built["python"], built["arrow_ids"], "ratio (baseline / Arrow with the id fingerprint)"),
        row("(b) the same, tokenized (max_length 512)", "baseline: dicts → `from_list`, then the same encoding", tokenized["python"]),
        row("", "Arrow → `dataset.tokenize_train`", tokenized["arrow"]),
        ratio(tokenized["python"], tokenized["arrow"], "ratio (baseline / Arrow)"),
        "",
        f"(a) is one run of each path. (b) gives medians of {args.repeats} runs over the trainable train rows of the "
        "imported database (rated 'good' or corrected, split 'train'), in (created_at, id) order. Without a "
        "fingerprint, `datasets` pickles and hashes the whole table (about 1 s per 400 MB here), as `from_list` does "
        "too; the store's rows never change once stored, so a hash of the ids names the content. The tokenized runs "
        f"take the first {args.tokenize_rows:,} rows: tokenizing (a byte-level BPE trained in-process) and the Python "
        "lists of token ids it makes cost the same on both paths and dominate them.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_block("ingest", text)


if __name__ == "__main__":
    main()
