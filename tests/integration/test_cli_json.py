"""What scripts and terminals read from the CLI: `--json` documents (checked against the library),
`incremental runs` on the session's Prefect API, `incremental run`'s terminal output (no Prefect
bookkeeping lines, the final state), its --on-busy choice, and help text without type noise."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from incremental.config import GatePolicy, MetricRule, RunConfig, ScreeningPolicy, TrainSettings
from incremental.dataset import plan_dataset
from incremental.feedback import EvalWindow, FeedbackStore
from incremental.registry import Registry
from incremental.reporting import version_table
from incremental.synthetic import synthetic_feedback

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
cli = CliRunner()
# One short epoch; prompt gain is noisy on the small base, so it is reported, not gated.
FAST = RunConfig(
    train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=320),
    gate=GatePolicy(
        prompt_gain=MetricRule(margin=0.03, gated=False), generation_rows=4, max_new_tokens=32,
        screening=ScreeningPolicy(enabled=False),
    ),
)  # fmt: skip
# Prefect's own lines about runs and tasks, which `incremental run` keeps off the terminal.
PREFECT_BOOKKEEPING = ("Beginning flow run", "Beginning subflow run", "Created task run", "Finished in state", "View at ")


def settings_for(folder: Path, small_base: Path, model: str = "tiny") -> dict[str, str]:
    return {
        "INCREMENTAL_DB_PATH": str(folder / "feedback.duckdb"),
        "INCREMENTAL_MODELS_ROOT": str(folder / "finetuned_models"),
        "INCREMENTAL_BASE_MODEL": str(small_base),
        "INCREMENTAL_MODEL": model,
        "INCREMENTAL_DEVICE": "cpu",
    }


def run_cli_process(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`incremental ARGS` as a real process, reporting to the session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        env={**os.environ, **settings, "PREFECT_API_URL": PREFECT_API_URL.value()}, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def first_run(prefect_api, small_base, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tree where `incremental run` trained v1 from 40 rows, with 30 more rows waiting; and that run's output."""
    folder = tmp_path_factory.mktemp("first-run")
    settings = settings_for(folder, small_base)
    store = FeedbackStore(folder / "feedback.duckdb")
    store.init()
    store.add_many(synthetic_feedback(40, 1, model="tiny"))
    config = folder / "fast.json"
    config.write_text(FAST.model_dump_json())
    done = run_cli_process(settings, "run", "--config", str(config))
    store.add_many(synthetic_feedback(30, 2, model="tiny"))
    return folder, done


@pytest.fixture
def tree(first_run, small_base, tmp_path, monkeypatch) -> Path:
    """A copy of the first run's tree, which the in-process CLI uses (this test may change it)."""
    folder = tmp_path / "tree"
    shutil.copytree(first_run[0], folder)
    for key, value in settings_for(folder, small_base).items():
        monkeypatch.setenv(key, value)
    return folder


def invoke_json(*args: str):
    done = cli.invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)  # the whole of stdout is one document


# -- incremental run ----------------------------------------------------------------------------


def test_run_prints_the_headline_and_final_state_without_prefect_bookkeeping(first_run) -> None:
    folder, done = first_run
    everything = done.stdout + done.stderr
    assert done.returncode == 0, everything[-4000:]
    version = Registry(folder / "finetuned_models", "tiny").versions()[0]
    accepted = version.manifest.status == "accepted"
    verdict = "accepted and promoted to current" if accepted else "rejected; current unchanged"
    headline, final = done.stdout.splitlines()[-2:]
    # An undecided verdict adds how many rows wait for more evidence (RunSummary.headline).
    undecided = not accepted and version.manifest.gate.verdict == "inconclusive"
    waiting = f"; not sure yet: {len(version.manifest.data.new_ids)} rows wait for more evidence" if undecided else ""
    assert headline == f"{version.name} (builds on base model) {verdict}{waiting}", everything[-4000:]
    assert final == f"Final state: {'Completed' if accepted else 'Rejected'}", everything[-4000:]
    assert f"[INCREMENTAL] Training {version.name} (builds on base model)" in done.stderr
    for line in PREFECT_BOOKKEEPING:
        assert line not in everything, everything[-4000:]
    # Nor the Trainer's raw log dicts, nor a bar per weight loading: the run's own lines carry the loss.
    assert "'loss'" not in everything and "Loading weights" not in everything, everything[-4000:]


@pytest.mark.parametrize("waiting", [["--on-busy", "skip"], ["--busy-timeout", "0.05"]], ids=["skip", "wait-times-out"])
def test_run_while_another_holds_the_slot_ends_skipped(prefect_api, small_base, tmp_path, waiting: list[str]) -> None:
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    model = f"busy-{uuid.uuid4().hex[:8]}"
    store = FeedbackStore(tmp_path / "feedback.duckdb")
    store.init()
    store.add_many(synthetic_feedback(20, 3, model=model))  # enough to train: only the busy slot stops it
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(f"retrain-{model}", 1)
    with concurrency(f"retrain-{model}", occupy=1, strict=True):
        done = run_cli_process(settings_for(tmp_path, small_base, model), "run", *waiting)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    headline, final = done.stdout.splitlines()[-2:]
    assert headline.startswith("Skipped: ") and model in headline and "no new feedback" not in headline, done.stdout
    assert final == "Final state: Skipped"
    assert not (tmp_path / "finetuned_models" / model).exists() or not Registry(tmp_path / "finetuned_models", model).versions()


# -- --json documents ---------------------------------------------------------------------------


def _hold_new_rows(tree: Path, count: int) -> tuple[Registry, FeedbackStore, str | None, list[str]]:
    """Hold the first `count` new rows of model tiny; returns the registry, store, current version and lineage."""
    registry, store = Registry(tree / "finetuned_models", "tiny"), FeedbackStore(tree / "feedback.duckdb")
    current = registry.current()
    lineage = registry.lineage(current) if current else []
    held = store.collect("tiny", lineage).new.column("id").to_pylist()[:count]
    store.mark("tiny", held, "hold", reason="checking", actor="test")
    return registry, store, current, lineage


def test_status_json_equals_the_library(tree: Path) -> None:
    registry, store, current, lineage = _hold_new_rows(tree, 2)

    status = invoke_json("status")

    trusted_before = registry.get(current).manifest.finalized_at if current else None
    assert status == {
        "model": "tiny",
        "mode": "incremental" if current else "base",
        "base_model": os.environ["INCREMENTAL_BASE_MODEL"],
        "current": current,
        "next_version_number": len(registry.versions()) + 1,
        "lineage": lineage,
        "rollback_targets": ["base"] if current else [],  # one version: current if accepted, so nothing else to go to
        "problems": [],
        "interrupted": [],
        "feedback": dataclasses.asdict(store.counts("tiny", lineage, trusted_before=trusted_before)),
        "held": {"rows": 2, "groups": 1, "oldest_held_at": store.held_groups("tiny")[0].oldest_held_at.isoformat()},
    }
    assert status["feedback"]["held"] == 2 and status["feedback"]["total"] == 70

    text = cli.invoke(app, ["status"]).output
    next_name = f"v{status['next_version_number']}"
    if current:
        assert f"Incremental Mode: loaded {current}; next training builds on {current} (as {next_name})" in text
        assert "Can roll back to: base (`incremental rollback VERSION`)" in text
    else:
        assert f"Base Mode: no accepted version of tiny; next training will be {next_name}, from the base model" in text


def test_versions_json_lists_the_table_rows_and_explains_a_verdict(tree: Path) -> None:
    registry = Registry(tree / "finetuned_models", "tiny")
    rows = invoke_json("versions")
    assert rows == json.loads(json.dumps([dataclasses.asdict(row) for row in version_table(registry)]))
    assert [row["name"] for row in rows] == [version.name for version in registry.versions()]

    name = rows[0]["name"]
    explained = invoke_json("versions", "--explain", name)
    manifest = registry.get(name).manifest
    assert explained["name"] == name and explained["status"] == manifest.status and explained["parent"] is None
    assert explained["gate"]["verdict"] == manifest.gate.verdict
    assert explained["gate"]["reasons"] == list(manifest.gate.reasons)
    assert explained["gate"]["checks"] == json.loads(json.dumps(list(manifest.gate.checks)))
    assert explained["data"]["new"] == len(manifest.data.new_ids) == 40 - len(manifest.data.eval_ids) - len(manifest.data.rejected_ids)
    # Synthetic rows name no generating version: the run's manifest counts them all as unrecorded.
    assert explained["data"]["new_by_generating_version"] == {"unrecorded": len(manifest.data.new_ids)}
    assert explained["problems"] == []


def test_dataset_preview_json_counts_equal_the_library(tree: Path) -> None:
    registry, store, current, lineage = _hold_new_rows(tree, 3)

    preview = invoke_json("dataset", "preview", "--examples", "4")

    config = RunConfig()
    window = EvalWindow(per_type=config.data.max_eval_rows_per_type, anchors=config.data.eval_anchor_rows)
    trusted_before = registry.get(current).manifest.finalized_at if current else None
    collected = store.collect("tiny", lineage, trusted_before=trusted_before, window=window)
    plan = plan_dataset(collected, config.data, seed=config.train.seed, fetch_rows=partial(store.rows, "tiny"))
    trusted = sum(collected.eval.column("trusted").to_pylist())
    counts = preview["counts"]
    assert preview["model"] == "tiny" and preview["builds_on"] == current
    assert counts["new"] == len(plan.new_ids) == collected.new.num_rows
    assert counts["replay"] == len(plan.replay_ids)
    assert (counts["eval"], counts["eval_trusted"], counts["eval_new"]) == (len(plan.eval_ids), trusted, len(plan.eval_ids) - trusted)
    assert counts["rejected"] == len(plan.rejected_ids)
    assert (counts["held"], counts["excluded"], counts["golden"]) == (3, 0, 0)
    assert preview["sample_ids"] == collected.new.column("id").to_pylist()[:4]
    for bucket in ("new", "replay", "eval_trusted", "eval_new", "rejected", "held"):
        assert sum(by_type[bucket] for by_type in preview["by_artifact_type"].values()) == counts[bucket], bucket
    new_types = collected.new.column("artifact_type").to_pylist()
    assert {kind: preview["by_artifact_type"][kind]["new"] for kind in set(new_types)} == {kind: new_types.count(kind) for kind in set(new_types)}


def test_json_in_base_mode_before_any_feedback(env) -> None:
    status = invoke_json("status")
    assert (status["mode"], status["current"], status["lineage"], status["feedback"]["total"]) == ("base", None, [], 0)
    assert invoke_json("versions") == []
    preview = invoke_json("dataset", "preview")
    assert preview["counts"]["new"] == 0 and preview["sample_ids"] == [] and preview["by_artifact_type"] == {}


# -- incremental runs ---------------------------------------------------------------------------


def test_runs_lists_retrain_runs_newest_first_with_state_model_and_deployment(prefect_api, monkeypatch) -> None:
    from prefect import flow, get_client
    from prefect.states import Completed, Running

    model, other = f"runs-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("INCREMENTAL_MODEL", model)  # a run with model=None is for this default model

    @flow(name="retrain")
    def stand_in(model: str | None = None) -> None:
        """A stand-in with the real flow's name: its runs are created and moved by hand, never executed."""

    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(flow_id=client.create_flow(stand_in), name=f"manual-{model}")

        def started(flow_run, final):
            client.set_flow_run_state(flow_run.id, Running(), force=True)
            if final is not None:
                client.set_flow_run_state(flow_run.id, final, force=True)
            return flow_run.name

        accepted = started(client.create_flow_run(stand_in, parameters={"model": model}), Completed())
        rejected = started(
            client.create_flow_run_from_deployment(deployment_id, parameters={"model": model}),
            Completed(name="Rejected", message="v2 rejected: target_nll got worse"),
        )
        elsewhere = started(client.create_flow_run(stand_in, parameters={"model": other}), Completed(name="Skipped"))
        waiting = started(client.create_flow_run(stand_in, parameters={"model": None}), Running(name="AwaitingSlot"))

    # Newest first; older runs of the session with model=None (other tests' real runs) are this model's too.
    listed = invoke_json("runs", "--model", model)[:3]
    assert [(run["name"], run["state"], run["model"], run["deployment"]) for run in listed] == [
        (waiting, "AwaitingSlot", model, None),
        (rejected, "Rejected", model, f"manual-{model}"),
        (accepted, "Completed", model, None),
    ]
    assert listed[1]["state_type"] == "COMPLETED" and listed[1]["message"] == "v2 rejected: target_nll got worse"
    assert all(run["start_time"] and run["duration_seconds"] >= 0 for run in listed)
    assert [run["name"] for run in invoke_json("runs", "--model", model, "--limit", "2")] == [waiting, rejected]
    everyone = {run["name"]: run["model"] for run in invoke_json("runs", "--limit", "200")}
    assert everyone[elsewhere] == other and everyone[waiting] == model

    table = cli.invoke(app, ["runs", "--model", model])
    assert table.exit_code == 0, table.output
    for expected in (waiting, "AwaitingSlot", rejected, "Rejected", f"manual-{model}", "target_nll got worse"):
        assert expected in table.stdout, table.stdout


# -- help text ----------------------------------------------------------------------------------


def _command_paths(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_help_shows_flags_bare_on_every_command() -> None:
    paths = list(_command_paths(typer.main.get_command(app)))
    assert ("runs",) in paths and ("feedback", "import") in paths
    for path in paths:
        done = cli.invoke(app, [*path, "--help"], terminal_width=200)
        assert done.exit_code == 0, done.output
        assert "<bool>" not in done.stdout, done.stdout
        for line in done.stdout.splitlines():
            if "--help" in line:
                assert line.split("--help", 1)[1].split()[:1] == ["Show"], line
    top = cli.invoke(app, ["--help"], terminal_width=200).stdout
    quiet = next(line for line in top.splitlines() if "--quiet" in line)
    assert quiet.split(" -q ", 1)[1].split()[:1] == ["Hide"], quiet
