"""The app keeps writing feedback while a run trains: another process appends rows in a loop (short
connections, bounded count and time) during a full flow run against the real Prefect harness.
Afterwards every row written is in the run's snapshot or waiting for the next run; none is lost or duplicated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from incremental.config import DataSettings, GatePolicy, MetricRule, RunConfig, ScreeningPolicy, TrainSettings
from incremental.feedback import FeedbackStore
from incremental.registry import Registry
from incremental.synthetic import synthetic_feedback

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = RunConfig(
    train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=320),
    data=DataSettings(max_eval_rows_per_type=None),
    gate=GatePolicy(prompt_gain=MetricRule(margin=0.03, gated=False), generation_rows=4, max_new_tokens=32,
                    screening=ScreeningPolicy(enabled=False)),
)  # fmt: skip

# Appends one row per short connection until it has written `limit` rows, `seconds` have passed, or
# the stop file appears; prints each id once its transaction committed.
WRITER = """
import sys, time
from pathlib import Path
from incremental.feedback import FeedbackStore
from incremental.synthetic import synthetic_feedback

path, stop, limit, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
store = FeedbackStore(path, lock_timeout_s=60)
rows = synthetic_feedback(limit, 77, model="tiny")
deadline = time.monotonic() + seconds
for number, row in enumerate(rows):
    if stop.exists() or time.monotonic() > deadline:
        break
    row_id = f"live-{number:04d}"
    store.add({**row, "id": row_id})
    print(row_id, flush=True)
    time.sleep(0.02)
"""


def test_rows_written_during_a_run_are_in_its_snapshot_or_new_for_the_next(prefect_api, env, tmp_path):
    from flows.retrain import retrain

    store = FeedbackStore(env.db_path)
    store.init()
    store.add_many(synthetic_feedback(40, 1, model="tiny"))
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(env.db_path), str(stop), "400", "240"],
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

    # Each row is stored exactly once.
    with duckdb.connect(str(env.db_path), read_only=True) as con:
        stored = dict(con.execute("SELECT id, count(*) FROM feedback WHERE id LIKE 'live-%' GROUP BY id").fetchall())
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
