"""Retrain on data: the served watcher (`watch-feedback/watch-tiny`) starts exactly one retrain of the
manual deployment when enough feedback is new and none is running, and none otherwise."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def _new_rows(server) -> int:
    from flows.watch_feedback import new_rows
    from incremental.settings import Settings

    return new_rows(Settings(db_path=server.db_path, models_root=server.models_root), "tiny")


def _watch(server, served, min_new_rows: int) -> tuple[dict, str]:
    created = server.create_run("watch-feedback/watch-tiny", {"min_new_rows": min_new_rows})
    run = server.wait(created["id"], timeout_s=300, logs=served)
    logs = server.log_text(created["id"], "[INCREMENTAL] ")
    assert (run["state"]["type"], run["state"]["name"]) == ("COMPLETED", "Completed"), f"{run['state']}\n{logs}"
    return run, logs


def test_too_few_new_rows_start_nothing(prefect_server, served):
    server = prefect_server
    server.add_feedback(4, 402)
    since = server.now()
    count = _new_rows(server)
    _, logs = _watch(server, served, min_new_rows=count + 1)
    assert f"[INCREMENTAL] No retrain of tiny: {count} new rows, waiting for {count + 1}" in logs
    assert server.flow_runs("retrain", since=since) == []


def test_enough_new_rows_start_one_retrain_and_not_a_second(prefect_server, served):
    server = prefect_server
    server.add_feedback(40, 401)
    count = _new_rows(server)
    assert count > 0
    since = server.now()
    # The slot is held, so the retrain the watcher starts is still waiting when the watcher runs again.
    with server.hold_slot("tiny"):
        _, logs = _watch(server, served, min_new_rows=count)
        [started] = server.flow_runs("retrain", since=since)
        assert started["deployment_id"] == server.deployment("retrain/manual-tiny")["id"]
        assert started["parameters"]["model"] == "tiny" and "watch-feedback" in started["tags"]
        assert f"[INCREMENTAL] Started retrain of tiny ({started['name']}): {count} new rows >= {count}" in logs

        _, again = _watch(server, served, min_new_rows=count)
        assert "a retrain of it is running or due" in again and started["name"] in again, again
        assert [run["id"] for run in server.flow_runs("retrain", since=since)] == [started["id"]]

        # That the manual deployment trains is the Run-button test's; this one is cancelled while it waits.
        versions = server.versions()
        server.post(f"/flow_runs/{started['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        cancelled = server.wait(started["id"], timeout_s=120, logs=served)
    assert cancelled["state"]["type"] == "CANCELLED", cancelled["state"]
    assert server.versions() == versions
