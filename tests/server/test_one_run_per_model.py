"""One retrain per model against a real server: a nightly run, a manual run and a CLI run of the same
model at once train it once; the others wait for the model's slot (`AwaitingSlot`) and then skip,
or skip at once as their `on_busy` says."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.integration

WAIT_TO_START_S = 300  # three runs import torch at once on a shared 2-core machine


def _state(run: dict) -> tuple[str, str]:
    return (run["state"]["type"], run["state"]["name"]) if run["state"] else ("", "")


def test_nightly_manual_and_cli_runs_at_once_train_the_model_once(prefect_server, served, fast_config, tmp_path):
    server = prefect_server
    versions_before = server.versions()
    since = server.now()
    server.add_feedback(40, 201)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(fast_config), encoding="utf-8")
    cli_log = tmp_path / "cli-run.log"

    # The test holds the model's slot until all three wait for it, so they compete for it at the same
    # moment, however long each took to start on a busy machine.
    with server.hold_slot("tiny"):
        nightly = server.create_run("retrain/nightly-tiny", {"config": fast_config})
        manual = server.create_run("retrain/manual-tiny", {"config": fast_config})
        cli = server.spawn("incremental", "run", "--model", "tiny", "--config", str(config_file), cwd=tmp_path, log=cli_log)
        try:
            deadline = time.monotonic() + WAIT_TO_START_S
            while True:
                runs = server.flow_runs("retrain", since=since)
                waiting = [r for r in runs if _state(r) == ("RUNNING", "AwaitingSlot")]
                if len(runs) == 3 and len(waiting) == 3:
                    break
                assert cli.poll() is None, f"the CLI run ended early ({cli.returncode}):\n{server.tail(cli_log)}"
                assert time.monotonic() < deadline, (
                    f"not all three runs wait for the slot: {[(r['name'], _state(r)) for r in runs]}\n"
                    f"serve:\n{server.tail(served)}\nCLI:\n{server.tail(cli_log)}"
                )
                time.sleep(1.0)
        except BaseException:
            server.stop(cli)
            raise
    ids = {run["id"] for run in runs}
    assert {nightly["id"], manual["id"]} < ids
    [cli_run] = [run for run in runs if run["deployment_id"] is None]

    # One of them gets the slot and trains; while it does, the other two still wait.
    seen_training_while_two_wait = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        states = {run["id"]: _state(server.run(run["id"])) for run in runs}
        if all(state[0] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for state in states.values()):
            break
        names = sorted(state for state in states.values())
        if names == [("RUNNING", "AwaitingSlot"), ("RUNNING", "AwaitingSlot"), ("RUNNING", "Running")]:
            seen_training_while_two_wait = True
        time.sleep(0.5)
    try:
        assert cli.wait(timeout=120) == 0, server.tail(cli_log)
    finally:
        server.stop(cli)

    finals = {run_id: server.run(run_id) for run_id in ids}
    outcomes = sorted(_state(run) for run in finals.values())
    waiting = "[INCREMENTAL] Waiting for the retrain slot of tiny"
    assert outcomes == [("COMPLETED", "Completed"), ("COMPLETED", "Skipped"), ("COMPLETED", "Skipped")], (
        f"{[(r['name'], r['state']) for r in finals.values()]}\n" + "\n---\n".join(server.log_text(i, waiting) for i in ids)
    )
    assert seen_training_while_two_wait
    new_versions = [v for v in server.versions() if v not in versions_before]
    assert len(new_versions) == 1 and server.current() == new_versions[0], server.versions()

    [trainer] = [run_id for run_id, run in finals.items() if _state(run) == ("COMPLETED", "Completed")]
    for run_id, run in finals.items():
        last = "[INCREMENTAL] Training" if run_id == trainer else "[INCREMENTAL] no new feedback for tiny"
        logs = server.log_text(run_id, waiting, last)
        assert ("RUNNING", "AwaitingSlot") in server.states(run_id)
        assert waiting in logs and last in logs, logs
        keys = {artifact["key"] for artifact in server.artifacts(run_id)}
        if run_id == trainer:
            assert f"[INCREMENTAL] Training {new_versions[0]}" in logs
            assert {"retrain-tiny", "versions-tiny", "dataset-tiny"} <= keys, keys
        else:
            # They waited, then found what the first one trained on already learned.
            assert "no new feedback for tiny" in run["state"]["message"], run["state"]
            assert "[INCREMENTAL] Training" not in logs
            assert "skipped-tiny" in keys and "retrain-tiny" not in keys, keys
    assert "skipped" in server.tail(cli_log).lower() or cli_run["id"] == trainer


@pytest.mark.parametrize(
    ("busy", "reason"),
    [
        pytest.param({"on_busy": "skip"}, "holds the slot retrain-tiny", id="skip"),
        pytest.param({"on_busy": "wait", "busy_timeout_minutes": 0.1}, "for the slot retrain-tiny", id="wait-times-out"),
    ],
)
def test_a_busy_model_is_skipped_with_the_reason(prefect_server, served, fast_config, busy, reason):
    server = prefect_server
    versions_before = server.versions()
    server.add_feedback(8, 300 + len(busy))  # something new, so only the slot stops it
    with server.hold_slot("tiny"):
        created = server.create_run("retrain/manual-tiny", {"config": fast_config, **busy})
        run = server.wait(created["id"], logs=served)
    logs = server.log_text(created["id"])
    assert _state(run) == ("COMPLETED", "Skipped"), f"{run['state']}\n{logs}"
    assert reason in run["state"]["message"], run["state"]
    assert server.versions() == versions_before
    keys = {artifact["key"] for artifact in server.artifacts(created["id"])}
    assert "skipped-tiny" in keys and "retrain-tiny" not in keys, keys
