"""The loop as its users run it, end to end on the small embedded base: a served model generates, a
person rates by generation id, the nightly run learns from the ratings, the server switches to the
new version without a restart, and the status line and the report say what happened.

The parts have their own tests (test_serving, test_history_report, test_compat); this one checks that
they agree with each other: the rated rows carry the version that generated them into the next
version's manifest, and the report shows the manifests' numbers.
"""

from __future__ import annotations

import pytest
from conftest import QUICK_RUN
from typer.testing import CliRunner

from cli.main import app
from incremental.feedback import FeedbackStore
from incremental.history_report import gather_history, render_html
from incremental.registry import Registry
from incremental.config import ScreeningPolicy
from incremental.synthetic import corrected_feedback, generate_cases, synthetic_feedback

pytestmark = pytest.mark.integration

# QUICK_RUN's wide margins: a tiny model's second version must be promoted here.
LOOSE = QUICK_RUN
# The same, screened as a nightly run is by default: what users teach must get through it.
SCREENED = LOOSE.model_copy(update={"gate": LOOSE.gate.model_copy(update={"screening": ScreeningPolicy()})})


def test_generate_rate_retrain_follow_report(prefect_api, env, env_store: FeedbackStore):
    from flows.retrain import retrain
    from incremental.serving import Generator

    env_store.add_many(synthetic_feedback(50, 1, model="tiny"))
    first = retrain(model="tiny", config=LOOSE)
    assert first.status == "accepted", first.reasons
    v1 = first.version

    # The app serves v1, a person asks for artifacts and corrects them.
    server = Generator("tiny", env, follow=True)
    cases = synthetic_feedback(8, 7, model="tiny", good_share=1.0, corrected_share=0.0)
    made = [server.generate(case["artifact_type"], case["prompt"], max_new_tokens=16) for case in cases]
    assert {generation.version for generation in made} == {v1}
    for generation, case in zip(made, cases):
        server.rate(generation.id, "needs_improvement", correction=case["output"])
    rated = {generation.id for generation in made}

    env_store.add_many(synthetic_feedback(20, 2, model="tiny"))
    second = retrain(model="tiny", config=LOOSE)
    assert second.status == "accepted", second.reasons
    v2 = second.version

    # The manifest counts its new rows by the version that generated them.
    manifest = Registry(env.models_root, "tiny").get(v2).manifest
    new_ids = set(manifest.data.new_ids)
    from_v1 = len(new_ids & rated)
    assert from_v1 >= 1, "no rated generation landed in the train split: too few rows for this test"
    assert manifest.data.new_by_generating_version == {v1: from_v1, "unrecorded": len(new_ids) - from_v1}

    # The server switched to v2 at its next request, without a restart.
    after = server.generate(cases[0]["artifact_type"], cases[0]["prompt"], max_new_tokens=16)
    assert after.version == v2 and server.status().version == v2 and server.last_error is None
    assert env_store.generation(after.id).version == v2

    # The status line and the report say the same.
    status = CliRunner().invoke(app, ["status"]).output
    assert f"Incremental Mode: loaded {v2}; next training builds on {v2} (as v3)" in status
    assert f"Can roll back to: {v1}, base" in status
    report = gather_history(Registry(env.models_root, "tiny"), FeedbackStore(env.db_path))
    assert report.current == v2 and report.lineage == (v2, v1)
    shown = {entry.name: entry.data for entry in report.versions}
    for name in (v1, v2):
        data = Registry(env.models_root, "tiny").get(name).manifest.data
        assert (shown[name].new, shown[name].replay, shown[name].eval) == (len(data.new_ids), len(data.replay_ids), len(data.eval_ids))
    assert shown[v2].by_generating_version == manifest.data.new_by_generating_version
    page = render_html(report)
    assert f"{from_v1} by v1" in page and f"{len(new_ids) - from_v1} unrecorded" in page


def test_the_users_loop_learns_their_corrections_without_a_release(prefect_api, env, env_store: FeedbackStore):
    """The README's loop as a new user runs it: generate about 20 artifacts, rate them (corrections as a
    careful user writes them, some in their own style, and a few good ones), run: the next version is
    accepted and trained on every rated train row, and nobody had to `feedback release` anything."""
    from flows.retrain import retrain
    from incremental.serving import Generator

    # Fixed ids: the split, so v1 and what screening compares with, are the same on every run.
    env_store.add_many([{**row, "id": f"day1-{i}"} for i, row in enumerate(synthetic_feedback(60, 41, model="tiny"))])
    first = retrain(model="tiny", config=SCREENED)
    assert first.status == "accepted", first.reasons

    server = Generator("tiny", env, follow=True)
    cases = generate_cases(20, 42)
    made = [server.generate(case.artifact_type, case.notes, max_new_tokens=48) for case in cases]
    exact = corrected_feedback(cases[:12], [g.output for g in made[:12]], model="tiny")
    restyled = corrected_feedback(cases[12:], [g.output for g in made[12:]], model="tiny", restyle_seed=5)
    rated = [
        server.rate(g.id, row["rating"], correction=row["correction"], rater="ana" if i % 2 else "ben")
        for i, (g, row) in enumerate(zip(made, exact + restyled))
    ]
    good = [{**row, "id": f"good-{i}", "rater": "ana"} for i, row in enumerate(synthetic_feedback(6, 43, model="tiny", good_share=1.0, corrected_share=0.0))]
    env_store.add_many(good)

    second = retrain(model="tiny", config=SCREENED)
    assert second.status == "accepted", second.reasons
    # Screening may flag a row now and then (its measured false-hold rate on clean rows is a few per
    # cent): at most one here, and nobody has to release the rest for them to be learned.
    holds = [m for m in env_store.marks("tiny") if m.action == "hold"]
    assert second.n_screened <= 1 and second.n_held == 0, [m.reason for m in holds]
    manifest = Registry(env.models_root, "tiny").get(second.version).manifest
    taught = set(rated) | {row["id"] for row in good}
    train_rows = taught - set(manifest.data.eval_ids) - set(manifest.data.arrived_with_batch_ids)
    assert len(train_rows) >= 15, "too few rated rows in the train split for this test"
    assert len(train_rows - set(manifest.data.new_ids)) <= second.n_screened
    assert [m for m in env_store.marks("tiny") if m.action == "release"] == []


def test_a_new_customers_domain_trains_with_the_novel_batch_recipe(prefect_api, env, env_store: FeedbackStore):
    """A batch the parent finds new (here a new domain's names) gets more replay and epochs, recorded in the
    manifest with its reason; an ordinary night from the distribution the lineage learned trains as configured."""
    from flows.retrain import retrain

    # Enough trusted eval rows of each type (screening's min_reference_rows) for novelty to be measured.
    env_store.add_many([{**row, "id": f"day1-{i}"} for i, row in enumerate(synthetic_feedback(180, 41, model="tiny"))])
    first = retrain(model="tiny", config=SCREENED)
    assert first.status == "accepted", first.reasons
    registry = Registry(env.models_root, "tiny")
    v1 = registry.get(first.version).manifest
    # Base mode: no trusted rows to measure novelty against, so the configured recipe.
    assert v1.data.recipe.startswith("configured (novelty not measured"), v1.data.recipe
    assert v1.run_config == SCREENED.model_dump(mode="json")

    env_store.add_many([{**row, "id": f"day2-{i}"} for i, row in enumerate(synthetic_feedback(40, 45, model="tiny"))])
    second = retrain(model="tiny", config=SCREENED)
    assert second.status == "accepted", second.reasons
    # A first version reads notes weakly: its prompt-gain rule once held this whole clean batch (36 of 36).
    assert second.n_screened <= 2, second.n_screened
    ordinary = registry.get(second.version).manifest
    assert ordinary.data.recipe.startswith("configured ("), ordinary.data.recipe
    assert ordinary.run_config == SCREENED.model_dump(mode="json") and ordinary.training.epochs == SCREENED.train.epochs

    env_store.add_many([{**row, "id": f"new-domain-{i}"} for i, row in enumerate(synthetic_feedback(40, 44, model="tiny", new_domain=True))])
    third = retrain(model="tiny", config=SCREENED)
    manifest = registry.get(third.version).manifest
    assert manifest.data.recipe.startswith("novel batch ("), manifest.data.recipe
    novel = int(manifest.data.recipe.split("(")[1].split(" of ")[0])
    assert novel >= SCREENED.novel_batch.min_novel_share * len(manifest.data.new_ids)
    trained = manifest.run_config
    assert (trained["data"]["replay_ratio"], trained["data"]["min_replay_rows"], trained["train"]["epochs"]) == (4.0, 256, 6.0)
    assert manifest.training.epochs == 6.0
    # Replay is everything the lineage learned: fewer than the recipe's 256 rows exist.
    assert set(manifest.data.replay_ids) == set(v1.data.new_ids) | set(ordinary.data.new_ids)
    assert {k: v for k, v in trained.items() if k not in ("data", "train")} == {
        k: v for k, v in SCREENED.model_dump(mode="json").items() if k not in ("data", "train")
    }
    # The run's data artifact in the Prefect UI says which recipe ran and why.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])))
    described = [t.description for t in tables if (t.description or "").startswith(f"Data of {third.version}")]
    assert described == [f"Data of {third.version}: rows per artifact type. Recipe: {manifest.data.recipe}"]
