"""`incremental serve` against a real Prefect server: what the deployments declare, a run started
the way the UI's Run button starts one, and parameters the server refuses before anything runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_served_deployments_declare_schedule_entrypoint_and_no_queue(prefect_server, served):
    nightly = prefect_server.deployment("retrain/nightly-tiny")
    manual = prefect_server.deployment("retrain/manual-tiny")
    watch = prefect_server.deployment("watch-feedback/watch-tiny")

    [schedule] = [s["schedule"] for s in nightly["schedules"]]
    assert (schedule["cron"], schedule["timezone"]) == ("30 3 * * *", "UTC")
    assert manual["schedules"] == []
    assert watch["schedules"][0]["schedule"]["interval"] == 15 * 60
    assert watch["parameters"] == {"model": "tiny", "min_new_rows": 50}
    for deployment in (nightly, manual):
        # The installed module, not a path relative to the folder serve was started from.
        assert deployment["entrypoint"] == "flows.retrain.retrain"
        assert deployment["parameters"] == {"model": "tiny"}
        # No deployment-level queue in front of the model's slot.
        assert deployment["global_concurrency_limit"] is None
        assert deployment["enforce_parameter_schema"]
        assert {"model", "config"} <= set(deployment["parameter_openapi_schema"]["properties"])


def test_run_button_trains_a_version_and_reports_it(prefect_server, served, fast_config):
    before = prefect_server.current()
    prefect_server.add_feedback(40, 101)
    fast_config["train"]["epochs"] = 1  # the edit a person makes in the form
    created = prefect_server.create_run("retrain/manual-tiny", {"config": fast_config})
    assert created["parameters"]["model"] == "tiny" and created["parameters"]["config"]["train"]["epochs"] == 1

    run = prefect_server.wait(created["id"], logs=served)
    logs = prefect_server.log_text(created["id"], "[INCREMENTAL] Training")
    assert (run["state"]["type"], run["state"]["name"]) == ("COMPLETED", "Completed"), f"{run['state']}\n{logs}"

    current = prefect_server.current()
    assert current is not None and current != before, prefect_server.versions()
    assert f"[INCREMENTAL] Training {current}" in logs

    artifacts = prefect_server.artifacts(created["id"])
    keys = {artifact["key"] for artifact in artifacts}
    assert {"retrain-tiny", "versions-tiny", "dataset-tiny"} <= keys, keys
    verdict = next(a for a in artifacts if a["key"] == "retrain-tiny")
    assert current in verdict["data"]
    assert "skipped-tiny" not in keys


@pytest.mark.parametrize(
    ("deployment", "parameters"),
    [
        pytest.param("retrain/manual-tiny", {"model": "../x"}, id="model-outside-the-models-root"),
        pytest.param("retrain/manual-tiny", {"config": {"train": {"epochs": 0}}}, id="epochs-out-of-range"),
        pytest.param("retrain/manual-tiny", {"config": {"train": {"learning_rate": "fast"}}}, id="learning-rate-not-a-number"),
        pytest.param("retrain/manual-tiny", {"on_busy": "queue"}, id="on-busy-not-an-option"),
        pytest.param("watch-feedback/watch-tiny", {"model": "../x"}, id="watcher-model-outside-the-models-root"),
        pytest.param("watch-feedback/watch-tiny", {"min_new_rows": 0}, id="watcher-threshold-out-of-range"),
    ],
)
def test_invalid_parameters_are_refused_before_any_run(prefect_server, served, deployment, parameters):
    flow_name = deployment.split("/")[0]
    target = prefect_server.deployment(deployment)
    runs_before = {r["id"] for r in prefect_server.flow_runs(flow_name)}
    response = prefect_server.request("POST", f"/deployments/{target['id']}/create_flow_run", {"parameters": parameters})
    assert response.status_code in (409, 422), response.text
    assert "Validation failed" in response.text or "validation" in response.text.lower(), response.text
    assert {r["id"] for r in prefect_server.flow_runs(flow_name)} == runs_before
