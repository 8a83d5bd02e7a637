"""The app keeps writing feedback while a run trains: another process appends rows in a loop (short
connections, bounded count and time) during a full flow run against the real Prefect harness.
Afterwards every row written is in the run's snapshot or waiting for the next run; none is lost or duplicated."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from incremental.config import DataSettings, GatePolicy, MetricRule, RunConfig, ScreeningPolicy, TrainSettings
from incremental.feedback import FeedbackStore, FeedbackStoreLockedError
from incremental.registry import Registry
from incremental.synthetic import synthetic_feedback

from conftest import held_by_another_process

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = RunConfig(
    train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=320),
    data=DataSettings(max_eval_rows_per_type=None),
    gate=GatePolicy(prompt_gain=MetricRule(margin=0.03, gated=False), generation_rows=4, max_new_tokens=32,
                    screening=ScreeningPolicy(enabled=False)),
)  # fmt: skip

# Appends one row per short connection until it has written `limit` rows, `seconds` have passed, or
# the stop file appears; once the run has reserved its version (its snapshot is taken by then) it also
# imports a 20,000-row Parquet file in one transaction. Prints each id once its transaction committed.
WRITER = """
import sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from incremental.feedback import FeedbackStore
from incremental.synthetic import synthetic_feedback

path, stop, limit, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
staging = Path(sys.argv[5])
store = FeedbackStore(path, lock_timeout_s=60)
rows = synthetic_feedback(limit, 77, model="tiny")
bulk = [{**row, "id": f"bulk-{number:05d}", "prompt": row["prompt"] + f" (bulk {number})"}
        for number, row in enumerate(synthetic_feedback(2000, 78, model="tiny") * 10)]
deadline = time.monotonic() + seconds
for number, row in enumerate(rows):
    if stop.exists() or time.monotonic() > deadline:
        break
    row_id = f"live-{number:04d}"
    store.add({**row, "id": row_id})
    print(row_id, flush=True)
    if bulk and staging.is_dir() and any(staging.iterdir()):
        bulk_file = path.parent / "bulk.parquet"
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "created_at"} for r in bulk]), bulk_file)
        store.import_file(bulk_file)
        print("\\n".join(r["id"] for r in bulk), flush=True)
        bulk = []
    time.sleep(0.02)
"""


def test_rows_written_during_a_run_are_in_its_snapshot_or_new_for_the_next(prefect_api, env, tmp_path):
    from flows.retrain import retrain

    store = FeedbackStore(env.db_path)
    store.init()
    store.add_many(synthetic_feedback(40, 1, model="tiny"))
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(env.db_path), str(stop), "400", "240", str(env.models_root / "tiny" / ".staging")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        first = writer.stdout.readline().strip()
        assert first == "live-0000", writer.stderr.read() if writer.stderr else first
        summary = retrain(config=FAST)
        stop.touch()
        rest, errors = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, errors
    written = [first, *rest.split()]
    assert summary.version is not None, summary.reasons

    # Each row is stored exactly once, the 20,000 imported during the run included.
    assert sum(row_id.startswith("bulk-") for row_id in written) == 20_000
    with duckdb.connect(str(env.db_path), read_only=True) as con:
        stored = dict(con.execute(
            "SELECT id, count(*) FROM feedback WHERE id LIKE 'live-%' OR id LIKE 'bulk-%' GROUP BY id"
        ).fetchall())  # fmt: skip
    assert stored == dict.fromkeys(written, 1)

    registry = Registry(env.models_root, "tiny")
    data = registry.get(summary.version).manifest.data
    in_snapshot = set(data.new_ids) | set(data.eval_ids) | set(data.rejected_ids)
    current = registry.current()
    after = store.collect("tiny", registry.lineage(current) if current else [])
    waiting = {i for table in (after.new, after.eval, after.rejected) for i in table.column("id").to_pylist()}
    missing = [row_id for row_id in written if row_id not in in_snapshot and row_id not in waiting]
    assert not missing, f"rows neither in the snapshot nor waiting for the next run: {missing[:5]}"
    # The writer really overlapped the run: some rows arrived after the snapshot was taken.
    late = [row_id for row_id in written if row_id not in in_snapshot]
    assert late, "the writer finished before the run took its snapshot; the test did not overlap them"
    assert len(set(late) & waiting) == len(late)


def test_a_database_held_past_the_retry_window_fails_the_run_before_training(prefect_api, env, monkeypatch):
    from flows.retrain import retrain

    store = FeedbackStore(env.db_path)
    store.init()
    store.add_many(synthetic_feedback(20, 1, model="tiny"))
    monkeypatch.setenv("INCREMENTAL_DB_LOCK_TIMEOUT_S", "1")
    with held_by_another_process(env.db_path, 120) as holder:
        began = time.monotonic()
        with pytest.raises(FeedbackStoreLockedError) as refused:
            retrain(config=FAST)
        waited = time.monotonic() - began
    assert str(env.db_path) in str(refused.value) and f"PID {holder.pid}" in str(refused.value)
    assert waited < 60, f"the run waited {waited:.0f} s for a lock the store gives up on after 1 s"
    # Nothing was reserved or trained.
    registry_root = env.models_root / "tiny"
    assert not registry_root.exists() or not any(registry_root.rglob("adapter_model.safetensors"))
