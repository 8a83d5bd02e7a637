"""What a run leaves in Prefect and on disk, observed through the real API (the session's harness):
named final states, one run per model, artifacts that keep the verdict history readable, and a
failure in any stage that names the stage and leaves nothing half-written."""

from __future__ import annotations

import json
import threading
import time

import duckdb
import pytest
from conftest import QUICK_RUN
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.concurrency.sync import concurrency

from incremental.config import ScreeningPolicy
from incremental.layout import STAGING_DIR
from incremental.registry import Registry
from incremental.synthetic import poisoned_feedback, synthetic_feedback

pytestmark = pytest.mark.integration

QUICK = QUICK_RUN


@pytest.fixture
def store(env_store):
    return env_store


def retrain(**kwargs):
    from flows.retrain import retrain as flow

    return flow(return_state=True, **kwargs)


def artifacts(key: str) -> list:
    """Every version of a keyed artifact, newest first."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda artifact: artifact.created, reverse=True)


def test_states_and_artifacts_say_what_happened(prefect_api, env, store):
    model = "states"
    state = retrain(model=model, config=QUICK)
    assert state.is_completed() and state.name == "Skipped", state
    assert "no new feedback" in state.message and state.result().status == "skipped"
    assert artifacts(f"skipped-{model}") and not artifacts(f"retrain-{model}")

    store.add_many(synthetic_feedback(50, 1, model=model))
    accepted = retrain(model=model, config=QUICK)
    summary = accepted.result()
    assert (accepted.type.value, accepted.name, summary.status) == ("COMPLETED", "Completed", "accepted"), accepted.message
    assert summary.version in accepted.message
    # Where the time went, stage by stage, in the summary and its artifact.
    assert {"collect-feedback", "train-candidate", "evaluate-candidate", "finalize-version"} <= set(summary.stage_seconds)
    assert 0 < summary.stage_seconds["train-candidate"] < summary.wall_seconds
    assert summary.overhead_seconds() is not None and "Time:" in summary.to_markdown()
    # Throughput of the training, measured in the run: in the summary (and its artifact) and the manifest.
    assert summary.training["tokens_per_second"] > 0 and 0 < summary.training["mfu"] < 1.5
    assert "real tokens/s" in summary.to_markdown() and "MFU" in summary.to_markdown()
    recorded = Registry(env.models_root, model).get(summary.version).manifest.training
    assert recorded.tokens_per_second == summary.training["tokens_per_second"]

    store.add_many(synthetic_feedback(20, 2, model=model))
    strict = QUICK.model_copy(update={"gate": QUICK.gate.model_copy(update={"min_eval_examples": 10_000})})
    rejected = retrain(model=model, config=strict)
    assert (rejected.type.value, rejected.name, rejected.result().status) == ("COMPLETED", "Rejected", "rejected")
    assert "rejected; current unchanged" in rejected.message

    # A skip after the verdicts (another run holds the model) goes under its own key: the verdict
    # history keeps the last real decision on top.
    from flows.model_slot import ensure_slot

    with concurrency(ensure_slot(model), occupy=1, strict=True):
        assert retrain(model=model, config=strict, on_busy="skip").name == "Skipped"
    verdicts = artifacts(f"retrain-{model}")
    assert [a.description for a in verdicts] == [rejected.message, accepted.message]
    assert len(artifacts(f"skipped-{model}")) == 2

    # The version table fits the artifact pane: narrow lineage table, then the scores.
    table = artifacts(f"versions-{model}")[0].data
    header = table.splitlines()[0]
    assert header == "| version | parent | outcome |"
    assert f"| {rejected.result().version} | v1 | ❌ rejected |" in table
    assert f"| {summary.version} | base | ✅ current |" in table
    assert max(len(line) for line in table.splitlines()) < 80

    # What the run trained and judged on, per artifact type, with a total row that adds up.
    rows = artifacts(f"dataset-{model}")[-1].data  # the first run's
    rows = json.loads(rows) if isinstance(rows, str) else rows
    total = rows[-1]
    assert total["artifact_type"] == "total" and total["new"] == summary.n_new and total["replay"] == summary.n_replay
    assert {row["artifact_type"] for row in rows[:-1]} <= {"erd", "api", "prototype"}
    assert total["eval_trusted"] + total["eval_with_batch"] + total["rejected_outputs"] >= 1


def _state_name(flow_run_id) -> str | None:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state_name


def test_a_run_that_finds_the_model_busy_skips_or_waits(prefect_api, env, store):
    from flows.model_slot import ensure_slot

    model = "busy"
    store.add_many(synthetic_feedback(50, 3, model=model))
    slot = ensure_slot(model)
    with concurrency(slot, occupy=1, strict=True):  # another run of this model is training
        skipped = retrain(model=model, config=QUICK, on_busy="skip")
        assert skipped.name == "Skipped" and "holds the slot retrain-busy" in skipped.message
        timed_out = retrain(model=model, config=QUICK, on_busy="wait", busy_timeout_minutes=0.1)
        assert timed_out.name == "Skipped" and "waited 0.1 min" in timed_out.message

        # Waiting shows in the run list while it waits; it goes on once the slot is free.
        result = {}
        waiter = threading.Thread(target=lambda: result.setdefault("state", retrain(model=model, config=QUICK, on_busy="wait")))
        waiter.start()
        seen = None
        deadline = time.monotonic() + 300
        while seen != "AwaitingSlot" and time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(limit=5, sort="START_TIME_DESC")
            seen = next((run.state_name for run in runs if run.parameters.get("on_busy") == "wait" and run.state_name == "AwaitingSlot"), seen)
            time.sleep(0.2)
        assert seen == "AwaitingSlot"
    waiter.join(timeout=600)
    assert result["state"].name == "Completed", result["state"].message
    assert Registry(env.models_root, model).current() == result["state"].result().version


# ---- a failure in each stage ------------------------------------------------------------------

# (task that fails, where it lives): the fault is injected by replacing the task's function, so
# the flow's own handling is what runs.
STAGES = [
    ("resolve-parent", "tasks.registry", "resolve_parent"),
    ("collect-feedback", "tasks.feedback", "collect_feedback"),
    ("prepare-base", "tasks.training", "prepare_base"),
    ("reserve-version", "tasks.registry", "reserve_version"),
    ("screen-new-rows", "tasks.screening", "screen_new_rows"),
    ("hold-rows", "tasks.feedback", "hold_rows"),
    ("build-dataset", "tasks.dataset", "build_dataset"),
    ("publish-dataset-summary", "tasks.report", "publish_dataset_summary"),
    ("train-candidate", "tasks.training", "train_candidate"),
    ("gate-candidate", "tasks.gate", "gate_candidate"),
    ("record-consumption", "tasks.feedback", "record_consumption"),
    ("finalize-version", "tasks.registry", "finalize_version"),
]

# Screening on, and three rows that are not what they claim among good ones: screening holds them
# (hold-rows runs) and enough rows remain to train.
SCREENED = QUICK.model_copy(update={"gate": QUICK.gate.model_copy(update={"screening": ScreeningPolicy()})})


def _seed_batch(store, model: str) -> set[str]:
    store.add_many(synthetic_feedback(24, 5, model=model))
    wrong = [{**row, "id": f"wrong-{i}"} for i, row in enumerate(poisoned_feedback(3, 6, "wrong_type", model=model))]
    store.add_many(wrong)
    return {row["id"] for row in wrong}


def _ledger_rows(env, model: str) -> int:
    with duckdb.connect(str(env.db_path), read_only=True) as con:
        return con.execute("SELECT count(*) FROM version_rows WHERE model = ?", [model]).fetchone()[0]


@pytest.mark.parametrize("stage, module, name", STAGES, ids=[stage for stage, _, _ in STAGES])
def test_a_failed_stage_is_named_and_leaves_nothing_behind(prefect_api, env, store, monkeypatch, stage, module, name):
    import importlib

    task = getattr(importlib.import_module(module), name)

    def broken(*args, **kwargs):
        raise RuntimeError(f"injected fault in {stage}")

    monkeypatch.setattr(task, "fn", broken)
    model = f"fail-{stage}"
    _seed_batch(store, model)
    state = retrain(model=model, config=SCREENED)

    assert state.is_failed(), state
    assert state.message.startswith(f"stage {stage} failed: RuntimeError: injected fault in {stage}"), state.message
    with pytest.raises(RuntimeError, match="injected fault"):
        state.result()
    registry = Registry(env.models_root, model)
    assert registry.versions() == [] and registry.current() is None
    staging = env.models_root / model / STAGING_DIR
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    assert _ledger_rows(env, model) == 0
    # Rows screening held for the failed run are released: the next run judges them again.
    assert store.collect(model, []).held.num_rows == 0


def test_a_failure_after_the_version_appeared_keeps_the_version(prefect_api, env, store, monkeypatch):
    import tasks.registry

    real = tasks.registry.finalize_version.fn

    def finalize_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("injected fault after the rename")

    monkeypatch.setattr(tasks.registry.finalize_version, "fn", finalize_then_fail)
    model = "fail-late"
    _seed_batch(store, model)
    state = retrain(model=model, config=QUICK)
    assert state.is_failed() and state.message.startswith("stage finalize-version failed: OSError"), state.message
    versions = Registry(env.models_root, model).versions()
    assert len(versions) == 1 and _ledger_rows(env, model) > 0  # immutable once it appeared: nothing undone


def test_bookkeeping_after_the_decision_does_not_fail_the_run(prefect_api, env, store, monkeypatch):
    import tasks.feedback
    import tasks.report

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault after the decision")

    monkeypatch.setattr(tasks.feedback.advance_learned_record, "fn", broken)
    monkeypatch.setattr(tasks.report.publish_report, "fn", broken)
    model = "late-bookkeeping"
    store.add_many(synthetic_feedback(50, 7, model=model))
    state = retrain(model=model, config=QUICK)
    assert state.name == "Completed", state.message
    registry = Registry(env.models_root, model)
    assert registry.current() == state.result().version
    # The learned record catches up by itself on the next collect.
    assert store.collect(model, registry.lineage()).new.num_rows == 0


def test_a_crashed_evaluation_rejects_the_candidate_instead_of_failing(prefect_api, env, store, monkeypatch):
    import incremental.evaluation

    def broken(*args, **kwargs):
        raise MemoryError("injected: out of memory while scoring")

    monkeypatch.setattr(incremental.evaluation, "evaluate_pair", broken)
    model = "eval-crash"
    store.add_many(synthetic_feedback(24, 8, model=model))
    state = retrain(model=model, config=QUICK)
    assert state.name == "Rejected" and "evaluation failed: MemoryError" in state.result().reasons[0]
    assert Registry(env.models_root, model).current() is None


def test_the_flow_refuses_a_model_name_the_project_refuses(prefect_api, env):
    from prefect.exceptions import ParameterTypeError

    from flows.retrain import retrain as flow

    with pytest.raises(ParameterTypeError, match="model"):
        flow(model="../x", config=QUICK)
    assert not env.models_root.exists() and not (env.models_root.parent / "x").exists()
