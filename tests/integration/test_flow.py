"""The retrain flow end to end against a real Prefect API (the session's test harness), a real
DuckDB file and a real tiny model that trains: the loop's invariants, observed from outside."""

from __future__ import annotations

import threading
import time

import pytest

from incremental.config import GatePolicy, RunConfig, TrainSettings
from incremental.feedback import FeedbackStore
from incremental.layout import STAGING_DIR
from incremental.registry import Registry
from incremental.synthetic import synthetic_feedback

pytestmark = pytest.mark.integration
FAST = RunConfig(train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=320))


@pytest.fixture
def store(env):
    store = FeedbackStore(env.db_path)
    store.init()
    return store


def retrain(**kwargs):
    from flows.retrain import retrain as flow

    return flow(**kwargs)


def test_loop_end_to_end(prefect_api, env, store):
    registry = Registry(env.models_root, "tiny")

    # Nothing to learn yet: a skipped run with its reason, not a failure.
    skipped = retrain(config=FAST)
    assert skipped.status == "skipped" and "no new feedback" in skipped.reasons[0]
    assert registry.versions() == []

    # Run 1, base mode.
    store.add_many(synthetic_feedback(40, 1, model="tiny"))
    first = retrain(config=FAST)
    assert first.parent is None and first.version.startswith("v1_")
    v1 = registry.get(first.version).manifest
    assert v1.training.mode == "base" and v1.status == first.status

    # The gate refuses: v2 is finalized as rejected, with reasons, and the pointer does not move.
    current_before = registry.current()
    store.add_many(synthetic_feedback(30, 2, model="tiny"))
    strict = FAST.model_copy(update={"gate": GatePolicy(min_eval_examples=10_000)})
    rejected = retrain(config=strict)
    assert rejected.status == "rejected" and "at least 10000" in rejected.reasons[0]
    assert registry.current() == current_before
    v2 = registry.get(rejected.version).manifest
    assert v2.status == "rejected" and v2.gate.verdict == "reject" and v2.promotion.promoted is False

    # Rows used only by the rejected candidate are still new, and the next run builds on the
    # current version, never on the rejected one.
    lineage = tuple(registry.lineage())
    new_ids = set(store.collect("tiny", lineage).new["id"].to_pylist())
    assert set(v2.data.new_ids) <= new_ids
    third = retrain(config=FAST)
    assert third.parent == current_before
    v3 = registry.get(third.version).manifest
    assert set(v2.data.new_ids) <= set(v3.data.new_ids)

    # Numbers strictly increase, rejected versions included.
    numbers = [v.number for v in registry.versions()]
    assert numbers == sorted(numbers) == [1, 2, 3]

    # Eval rows are never trained on, by any version.
    for version in registry.versions():
        data = version.manifest.data
        assert not set(data.eval_ids) & (set(data.new_ids) | set(data.replay_ids))
        assert not set(data.rejected_ids) & (set(data.new_ids) | set(data.replay_ids))


def test_feedback_committed_during_a_run_is_learned_by_the_next(prefect_api, env, store):
    store.add_many(synthetic_feedback(40, 11, model="tiny"))
    staging = env.models_root / "tiny" / STAGING_DIR
    results = {}
    runner = threading.Thread(target=lambda: results.setdefault("first", retrain(config=FAST)))
    runner.start()
    # The reservation appears after the feedback was collected: commit a row while the run trains.
    deadline = time.monotonic() + 300
    while not (staging.exists() and any(staging.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    late_ids = store.add_many(synthetic_feedback(8, 12, model="tiny", good_share=1.0, corrected_share=0.0))
    runner.join()
    first = Registry(env.models_root, "tiny").get(results["first"].version).manifest
    assert not set(late_ids) & set(first.data.new_ids + first.data.eval_ids)

    second = retrain(config=FAST)
    learned = Registry(env.models_root, "tiny").get(second.version).manifest.data
    late_train = [i for i in late_ids if i not in set(learned.eval_ids)]
    assert late_train and set(late_train) <= set(learned.new_ids)
