"""Deployments registered on a real Prefect API: the nightly schedule, one run at a time, and the
run config rendered as a validated form."""

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
        assert deployment.global_concurrency_limit.limit == 1
        schema = deployment.parameter_openapi_schema
        assert {"model", "config"} <= set(schema["properties"])
        assert {"RunConfig", "TrainSettings", "GatePolicy"} <= set(schema["definitions"])
        assert deployment.enforce_parameter_schema
