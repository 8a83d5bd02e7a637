"""The retrain flow end to end against a real Prefect API (the session's test harness), a real
DuckDB file and a real tiny model that trains: the loop's invariants, observed from outside."""

from __future__ import annotations

import json
import threading
import time

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from incremental.config import DataSettings, GatePolicy, MetricRule, RunConfig, ScreeningPolicy, TrainSettings
from incremental.layout import MANIFEST, STAGING_DIR
from incremental.prompting import LATEST_LAYOUT
from incremental.scoring import generate_greedy
from incremental.serving import generate_artifact
from incremental.registry import Registry
from incremental.evaluation import evidence_from_table
from incremental.gate import decide
from incremental.synthetic import poisoned_feedback, synthetic_feedback

pytestmark = pytest.mark.integration
# One epoch, short generations; the small test base barely reads its notes, so prompt gain (noisy
# on it) is reported, not gated, and rows are not screened unless a test says so.
FAST = RunConfig(
    train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=320),
    gate=GatePolicy(
        prompt_gain=MetricRule(margin=0.03, gated=False), generation_rows=4, max_new_tokens=32,
        screening=ScreeningPolicy(enabled=False),
    ),
)


@pytest.fixture
def store(env_store):
    return env_store


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

    # Too few trusted rows to judge on: v2 is finalized as rejected (inconclusive), with reasons,
    # and the pointer does not move.
    current_before = registry.current()
    store.add_many(synthetic_feedback(30, 2, model="tiny"))
    strict = FAST.model_copy(update={"gate": FAST.gate.model_copy(update={"min_eval_examples": 10_000})})
    rejected = retrain(config=strict)
    assert rejected.status == "rejected" and "fewer than 10000 trusted eval rows" in rejected.reasons[0]
    assert registry.current() == current_before
    v2 = registry.get(rejected.version).manifest
    assert v2.status == "rejected" and v2.gate.verdict == "inconclusive" and v2.promotion.decision == "keep"

    # Too few rows is no evidence against the batch: it is not held, its rows are still new, and
    # the next run builds on the current version, never on the rejected one.
    assert v2.gate.held_ids == () and rejected.n_held == 0
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

    # Every version's snapshot rebuilds from its manifest and the stored rows, to the same hashes;
    # the manifest says how its eval rows were chosen.
    for version in registry.versions():
        rebuilt = CliRunner().invoke(app, ["dataset", "rebuild", version.name, "--out", str(env.models_root.parent / version.name)])
        assert rebuilt.exit_code == 0, rebuilt.output
        assert rebuilt.output.count("matches") == 2
        window = version.manifest.data.eval_window
        assert window["per_type"] == FAST.data.max_eval_rows_per_type
        assert window["eval_rows_scored"] == len(version.manifest.data.eval_ids)


def test_a_lineage_keeps_the_prompt_layout_it_was_trained_with(prefect_api, env, store):
    """A version written before prompt layouts were recorded (no `prompt_layout` in its manifest: layout 1)
    is continued, judged and served in layout 1; a lineage started now takes the latest layout."""
    from incremental.evaluation import generation_scorer, nll_scorer
    from incremental.modeling import Hardware
    from incremental.serving import load_model

    registry = Registry(env.models_root, "tiny")
    store.add_many(synthetic_feedback(40, 1, model="tiny"))
    first = retrain(config=FAST)
    if registry.current() != first.version:  # the gate's verdict on the small test base is not what this test is about
        registry.rollback(first.version, force=True, reason="the test continues v1 whatever the gate said")
    assert registry.get(first.version).manifest.prompt_layout == LATEST_LAYOUT != 1
    # As an older release wrote it (the manifest is not among the files it hashes).
    path = registry.root / first.version / MANIFEST
    old = json.loads(path.read_text())
    del old["prompt_layout"]
    old["schema_version"] = 3
    path.write_text(json.dumps(old))
    assert registry.parent().prompt_layout == 1

    store.add_many(synthetic_feedback(30, 2, model="tiny"))
    second = retrain(config=FAST)
    child = registry.get(second.version).manifest
    assert child.parent == first.version and child.prompt_layout == 1
    # Judged in layout 1: candidate and parent were scored with the layout-1 scorers (v1 also has the
    # latest layout's scores, from when it was a candidate itself).
    hardware, length, tokens = Hardware.from_settings(env), FAST.train.max_length, FAST.gate.max_new_tokens
    layout_1 = {nll_scorer(hardware, length, 1), generation_scorer(hardware, length, tokens, 1)}
    with duckdb.connect(str(env.db_path), read_only=True) as con:
        rows = con.execute("SELECT DISTINCT version, scorer FROM score_cache").fetchall()
    assert {scorer for version, scorer in rows if version == second.version} == layout_1
    assert layout_1 <= {scorer for version, scorer in rows if version == first.version}
    # Served in layout 1: what serving returns is layout-1 greedy decoding of that adapter.
    loaded = load_model("tiny", env, version=second.version)
    assert loaded.prompt_layout == 1
    notes = "The clinic books appointments for patients; each appointment has a time and a room."
    served = generate_greedy(loaded.model, loaded.tokenizer, [("erd", notes)], max_new_tokens=24, prompt_layout=1)[0]
    assert generate_artifact(loaded, "erd", notes, max_new_tokens=24) == served


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


def test_an_undecided_batch_waits_for_more_evidence_and_only_rows_it_did_not_settle_go_to_a_person(prefect_api, env, store):
    registry = Registry(env.models_root, "tiny")
    store.add_many([{**row, "id": f"day1-{i}"} for i, row in enumerate(synthetic_feedback(60, 31, model="tiny"))])
    first = retrain(config=FAST)
    if registry.current() != first.version:  # the gate's verdict on the small test base is not what this test is about
        registry.rollback(first.version, force=True, reason="the test continues v1 whatever the gate said")

    # Too few trusted rows to decide (deterministically undecided): the parent stays, nothing is held.
    undecided = FAST.model_copy(update={"gate": FAST.gate.model_copy(update={"min_eval_examples": 10_000, "max_waits": 1})})
    store.add_many([{**row, "id": f"night1-{i}"} for i, row in enumerate(synthetic_feedback(30, 32, model="tiny"))])
    night1 = retrain(config=undecided)
    v2 = registry.get(night1.version).manifest
    assert night1.status == "rejected" and night1.verdict == "inconclusive" and night1.n_held == 0
    assert night1.n_waiting == len(v2.data.new_ids) > 0 and store.held_by("tiny", night1.version) == ()
    assert "wait for more evidence" in night1.to_markdown() and "rows wait for more evidence" in night1.headline()
    from incremental.history_report import gather_history, history_markdown

    report = gather_history(registry, store)
    assert report.waiting == len(v2.data.new_ids) and report.waiting_since == v2.finalized_at
    assert f"Not sure yet: {report.waiting} rows wait for more evidence" in history_markdown(report)

    # The next night trains on them again, with what arrived; rows that had waited max_waits times
    # already go to a person, the newer ones wait.
    store.add_many([{**row, "id": f"night2-{i}"} for i, row in enumerate(synthetic_feedback(20, 33, model="tiny"))])
    night2 = retrain(config=undecided)
    v3 = registry.get(night2.version).manifest
    assert set(v2.data.new_ids) < set(v3.data.new_ids)
    held = set(store.held_by("tiny", night2.version))
    assert held == set(v2.data.new_ids) and set(v3.gate.held_ids) == held and night2.n_held == len(held)
    assert night2.n_waiting == len(v3.data.new_ids) - len(held) > 0
    assert all("waited through 2 undecided candidates" in m.reason for m in store.marks("tiny", sorted(held)))

    # With evidence that settles it (here: a margin this small model clears), the waiting rows are
    # learned: no person was needed for them.
    settles = FAST.model_copy(update={"gate": FAST.gate.model_copy(update={"target_nll": MetricRule(margin=1.0)})})
    accepted = retrain(config=settles)
    assert accepted.status == "accepted", accepted.reasons
    learned = set(registry.get(accepted.version).manifest.data.new_ids)
    assert set(v3.data.new_ids) - held <= learned and not held & learned


def test_a_batch_the_gate_blames_is_held_until_released(prefect_api, env, store):
    registry = Registry(env.models_root, "tiny")
    store.add_many([{**row, "id": f"day1-{i}"} for i, row in enumerate(synthetic_feedback(60, 21, model="tiny"))])
    first = retrain(config=FAST)
    if registry.current() != first.version:  # the gate's verdict on the small test base is not what this test is about
        registry.rollback(first.version, force=True, reason="the test continues v1 whatever the gate said")

    # Filler text rated good as every artifact, trained hard: the model unlearns the artifacts, and
    # the trusted rows (day 1's eval rows) show it while the batch's own eval rows look better.
    words = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur")
    poison = [
        {**row, "id": f"bad-{i}", "output": " ".join(words[(i + k) % len(words)] for k in range(60))}
        for i, row in enumerate(poisoned_feedback(40, 22, "constant", model="tiny"))
    ]
    store.add_many(poison)
    hard = FAST.model_copy(
        update={"train": TrainSettings(epochs=8, batch_size=8, learning_rate=2e-2, max_length=320), "data": DataSettings(replay_ratio=0)}
    )
    rejected = retrain(config=hard)
    manifest = registry.get(rejected.version).manifest
    assert rejected.status == "rejected" and manifest.gate.verdict == "reject", rejected.reasons
    assert registry.current() == first.version
    held = set(store.held_by("tiny", rejected.version))
    bad_ids = {row["id"] for row in poison}
    assert held == bad_ids and set(manifest.gate.held_ids) == bad_ids and rejected.n_held == len(bad_ids)
    assert set(manifest.data.new_ids) | set(manifest.data.arrived_with_batch_ids) == bad_ids

    # The verdict on paper: recomputed from the per-example scores stored with the version.
    scores = pq.read_table(registry.root / rejected.version / "scores.parquet")
    again = decide(evidence_from_table(scores, manifest.data.eval_snapshot_hash, first_version=False), hard.gate)
    assert [c.as_record() for c in again.checks] == list(manifest.gate.checks)

    # Held rows are neither trained nor trusted: nothing is new, the next run is skipped and says why.
    skipped = retrain(config=FAST)
    assert skipped.status == "skipped" and f"{len(bad_ids)} rows are held" in skipped.reasons[0]

    # What a person sees: the verdict as a table artifact in the Prefect UI, explained on the
    # command line, the held rows with their reason, the counts.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])))
    verdict_tables = [t for t in tables if (t.description or "").startswith(f"Gate verdict for {rejected.version}")]
    assert verdict_tables and "reject" in verdict_tables[0].description
    rows = json.loads(verdict_tables[0].data) if isinstance(verdict_tables[0].data, str) else verdict_tables[0].data
    assert {"metric", "slice", "interval", "verdict"} <= set(rows[0])
    cli = CliRunner()
    explained = cli.invoke(app, ["versions", "--explain", rejected.version])
    assert explained.exit_code == 0, explained.output
    assert "Gate verdict: reject" in explained.output and f"{len(bad_ids)} rows held" in explained.output
    assert "target_nll" in explained.output and "regression" in explained.output
    listed = cli.invoke(app, ["feedback", "held"])
    assert f"{len(bad_ids)} held rows" in listed.output and "batch of rejected" in listed.output
    assert f"{len(bad_ids)} held" in cli.invoke(app, ["status"]).output
    calibrated = cli.invoke(app, ["gate", "calibrate", "--config", str(write_config(env, FAST))])
    assert calibrated.exit_code == 0, calibrated.output
    assert "Noise floor" in calibrated.output and "target_nll" in calibrated.output

    # A person releases them: the next run trains on them again (and is judged again).
    released = cli.invoke(app, ["feedback", "release", "--version", rejected.version, "--by", "ana", "--reason", "reviewed"])
    assert released.exit_code == 0 and f"Released {len(bad_ids)} of {len(bad_ids)} rows" in released.output, released.output
    assert store.marks("tiny", [sorted(bad_ids)[0]])[-1].actor == "ana"
    again_run = retrain(config=FAST)
    retrained = registry.get(again_run.version).manifest.data
    assert set(retrained.new_ids) | set(retrained.arrived_with_batch_ids) == bad_ids


def test_screening_holds_rows_that_are_not_what_they_claim(prefect_api, env, store):
    # The format check needs no reference rows, so it screens in base mode too.
    wrong = [{**row, "id": f"wrong-{i}"} for i, row in enumerate(poisoned_feedback(12, 32, "wrong_type", model="tiny"))]
    store.add_many(wrong)
    screening = FAST.model_copy(update={"gate": FAST.gate.model_copy(update={"screening": ScreeningPolicy()})})
    summary = retrain(config=screening)
    # Train rows and the eval rows that came with them: a held eval row never becomes trusted later.
    assert summary.status == "skipped" and summary.n_screened == len(wrong) and "screening held" in summary.reasons[0]
    marks = store.marks("tiny")
    assert {m.feedback_id for m in marks} == {row["id"] for row in wrong}
    assert {m.actor for m in marks} == {"screening"} and all("does not parse as" in m.reason for m in marks)
    assert store.collect("tiny", []).eval.num_rows == 0

    # A person looks at them and releases them: the next run trains on them, screening does not hold them again.
    store.mark("tiny", [row["id"] for row in wrong], "release", reason="reviewed: they are right", actor="ana")
    trained = retrain(config=screening)
    manifest = Registry(env.models_root, "tiny").get(trained.version).manifest
    assert trained.n_screened == 0 and manifest.data.screened_ids == ()
    assert set(manifest.data.new_ids) | set(manifest.data.arrived_with_batch_ids) == {row["id"] for row in wrong}
    assert [m.actor for m in store.marks("tiny", [wrong[0]["id"]])] == ["screening", "ana"]


def write_config(env, config: RunConfig):
    path = env.db_path.parent / "run.json"
    path.write_text(config.model_dump_json())
    return path
