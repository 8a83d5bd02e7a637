"""`incremental demo` as a user runs it, on the real embedded default (the tiny base as users get it):
the story (v1 accepted, v2 better than v1 and accepted, a poisoned batch rejected by the gate alone with
v2 still current and held, a second one held by screening, rollback to v1, v4 built on v1 from clean
rows only), what each accepted version generates on fresh notes, and nothing of the machinery on the
terminal. The slowest test: it trains four versions, in a real process (whose terminal output is what
is checked), reporting to the session's Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
# What `incremental demo` keeps off the terminal: Prefect's bookkeeping lines, the Trainer's raw log
# dicts ({'loss': ..., 'grad_norm': ...}, then {'train_runtime': ...}) and the weight-loading bars.
MACHINERY = ("Beginning flow run", "Finished in state", "View at ", "'loss'", "'train_runtime'", "Loading weights")


def test_demo_tells_the_story_and_only_the_story(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from cli.demo import DAY3_POISON, DAY3B_POISON, QUALITY_FILE, QUALITY_PER_TYPE, day_ids
    from incremental.feedback import FeedbackStore
    from incremental.registry import Registry
    from incremental.serving import BASE
    from incremental.synthetic import ARTIFACT_TYPES

    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "demo", "--workdir", str(workdir)],
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    everything = done.stdout + done.stderr
    # The demo checks its own story and exits 1 saying what went otherwise.
    assert done.returncode == 0, everything[-4000:]
    assert "Story checked" in done.stdout and "Versions of tiny" in done.stdout, done.stdout[-4000:]
    for line in MACHINERY:
        assert line not in everything, f"{line!r} on the terminal:\n{everything[-4000:]}"
    assert "[INCREMENTAL] Training v1_" in done.stderr  # the runs' own log lines stay

    registry = Registry(workdir / "finetuned_models", "tiny")
    v1, v2, v3, v4 = registry.versions()
    assert [(v.manifest.status, v.manifest.parent) for v in (v1, v2, v3, v4)] == [
        ("accepted", None), ("accepted", v1.name), ("rejected", v2.name), ("accepted", v1.name),
    ]  # fmt: skip
    assert registry.current() == v4.name and v3.name in done.stdout
    # Both poisoned batches are held (by the gate, then by screening), and v4 trained on none of them.
    poisoned = set(day_ids(DAY3_POISON, 0)) | set(day_ids(DAY3B_POISON, 0))
    store = FeedbackStore(workdir / "feedback.duckdb")
    assert poisoned <= {mark.feedback_id for mark in store.marks("tiny") if mark.action == "hold"}
    v4_data = v4.manifest.data
    assert not poisoned & (set(v4_data.new_ids) | set(v4_data.replay_ids))
    assert [entry["action"] for entry in registry.history()][:3] == ["promote", "promote", "rollback"]

    # What users receive: the base and every accepted version, none of the rejected v3.
    title = f"What users receive: greedy generations on {QUALITY_PER_TYPE} fresh meeting notes per type"
    assert title in done.stdout, done.stdout[-4000:]
    quality = json.loads((workdir / QUALITY_FILE).read_text())
    assert list(quality["versions"]) == [BASE, v1.name, v2.name, v4.name]
    for name, by_type in quality["versions"].items():
        assert list(by_type) == [*ARTIFACT_TYPES, "all"]
        assert [by_type[t]["n"] for t in ARTIFACT_TYPES] == [QUALITY_PER_TYPE] * len(ARTIFACT_TYPES)
        assert by_type["all"]["n"] == QUALITY_PER_TYPE * len(ARTIFACT_TYPES)
        assert all(0 <= q["validity"] <= 1 and 0 <= q["content_f1"] <= 1 for q in by_type.values()), name
        table_row = next(line for line in done.stdout.splitlines() if f" {name} " in line and "%" in line)
        assert f"{by_type['all']['validity']:.0%}" in table_row, table_row
    # Training teaches the format: the current version's generations parse more often than the base's.
    assert quality["versions"][v4.name]["all"]["validity"] > quality["versions"][BASE]["all"]["validity"]
