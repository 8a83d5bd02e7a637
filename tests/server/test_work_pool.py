"""The work-pool path against a real server: `deploy_to_pool` creates the process pool and registers
the deployments, and a real `prefect worker start` runs a retrain from that pool."""

from __future__ import annotations

from datetime import timedelta

import pytest

pytestmark = pytest.mark.integration

POOL = "gpu-hosts"
MODEL = "pooled"  # not the served model: the pool's deployments must not replace serve's


def test_deploy_to_pool_and_a_worker_runs_the_retrain(prefect_server, fast_config, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.retrain import PROJECT_ROOT, deploy_to_pool, ensure_process_pool

    server = prefect_server
    assert server.request("GET", f"/work_pools/{POOL}").status_code == 404
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        deploy_to_pool(MODEL, POOL, timezone="Europe/Berlin")
        assert ensure_process_pool(POOL) is False  # idempotent: an existing pool is left as it is
        # Deploying again updates the same deployments, and adds the watcher when asked.
        deploy_to_pool(MODEL, POOL, timezone="Europe/Berlin", watch_every=timedelta(hours=6))

    pool = server.get(f"/work_pools/{POOL}")
    assert pool["type"] == "process" and "command" in pool["base_job_template"]["variables"]["properties"]
    nightly = server.deployment(f"retrain/nightly-{MODEL}")
    manual = server.deployment(f"retrain/manual-{MODEL}")
    [schedule] = [s["schedule"] for s in nightly["schedules"]]
    assert (schedule["cron"], schedule["timezone"]) == ("30 3 * * *", "Europe/Berlin")
    for deployment in (nightly, manual):
        assert deployment["work_pool_name"] == POOL
        # The project folder, by absolute path: the worker's own folder does not matter.
        assert deployment["entrypoint"] == "flows/retrain.py:retrain"
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
        ]
        assert deployment["global_concurrency_limit"] is None
    watch = server.deployment(f"watch-feedback/watch-{MODEL}")
    assert watch["work_pool_name"] == POOL and watch["entrypoint"] == "flows/watch_feedback.py:watch_feedback"
    assert watch["schedules"][0]["schedule"]["interval"] == 6 * 3600

    server.add_feedback(40, 501, model=MODEL)
    created = server.create_run(f"retrain/manual-{MODEL}", {"config": fast_config})
    log = tmp_path / "worker.log"
    worker = server.spawn("prefect", "worker", "start", "--pool", POOL, "--limit", "1", cwd=tmp_path, log=log)
    try:
        run = server.wait(created["id"], logs=log)
    finally:
        server.stop(worker)
    logs = server.log_text(created["id"], "[INCREMENTAL] Training")
    assert (run["state"]["type"], run["state"]["name"]) == ("COMPLETED", "Completed"), f"{run['state']}\n{logs}\n{server.tail(log)}"
    assert run["work_pool_name"] == POOL
    current = server.current(MODEL)
    assert current is not None and f"[INCREMENTAL] Training {current}" in logs
