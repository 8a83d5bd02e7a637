"""Deployments registered on a real Prefect API: the nightly schedule, no per-deployment queue, and
the run config rendered as a validated form."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_nightly_and_manual_deployments(prefect_api):
    from prefect import get_client

    from deployments.retrain import NIGHTLY_CRON, build_deployments

    nightly, manual = build_deployments("tiny", timezone="Europe/Berlin")
    ids = [nightly.apply(), manual.apply()]
    with get_client(sync_client=True) as client:
        read = [client.read_deployment(deployment_id) for deployment_id in ids]
    nightly_read, manual_read = read
    schedule = nightly_read.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == (NIGHTLY_CRON, "Europe/Berlin")
    assert manual_read.schedules == []
    for deployment in read:
        assert deployment.parameters == {"model": "tiny"}
        # No per-deployment queue in front of the model's slot (the flow holds retrain-<model>).
        assert deployment.global_concurrency_limit is None
        schema = deployment.parameter_openapi_schema
        assert {"model", "config", "on_busy", "busy_timeout_minutes"} <= set(schema["properties"])
        assert schema["properties"]["on_busy"]["enum"] == ["wait", "skip"]
        assert {"RunConfig", "TrainSettings", "GatePolicy"} <= set(schema["definitions"])
        assert deployment.enforce_parameter_schema
