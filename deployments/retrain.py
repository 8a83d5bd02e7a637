"""How the retrain flow is deployed: a nightly schedule, a manual ("Run" button) deployment, and a
watcher that starts the manual one when enough new feedback has arrived.

Declarations only. Two ways to run them:
- `serve_deployments`: one long-running process on the training machine executes the runs
  (simplest; one GPU box).
- `deploy_to_pool`: register the same deployments on a process work pool whose workers run on GPU
  machines (`prefect worker start --pool <pool>`); the pool is created if it is missing.
Both need a Prefect server (`prefect server start`): schedules never fire on the embedded API.

One retrain per model is not a deployment setting: the flow holds the model's slot (the global
concurrency limit `retrain-<model>`) for its whole run, whichever deployment, CLI or host started it.
A run that finds the slot taken shows `AwaitingSlot` (or ends `Skipped`, as its `on_busy` says).
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectAlreadyExists
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from flows.retrain import retrain
from flows.watch_feedback import watch_feedback

# 03:30 rather than 02:30: in daylight-saving zones the 02:00-03:00 hour is skipped once a year.
NIGHTLY_CRON = "30 3 * * *"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# How often the watcher counts new feedback (one read-only DuckDB query), and how many new rows start a retrain.
WATCH_EVERY = timedelta(minutes=15)
WATCH_MIN_NEW_ROWS = 50
# Runs this serve process executes at once. At most one of them trains per model (the flow's slot);
# the others wait for the slot, visibly, or skip. With 1, a second run would never start: it would
# sit `Late` on the server with no word of what it waits for, and would block the watcher too.
SERVE_LIMIT = 4
# No deployment concurrency limit either: it would queue a second run of the same deployment in
# front of the model's slot (`AwaitingConcurrencySlot`: nothing started, nothing logged), and it
# covers one deployment only, not the model's other deployment, a CLI run or another host.


def _specs(model: str, timezone: str, watch_every: timedelta | None) -> list[tuple[Any, dict[str, Any]]]:
    """(flow, deployment settings) for each deployment of `model`; serve and pools share them."""
    tags = ["incremental", model]
    specs: list[tuple[Any, dict[str, Any]]] = [
        (retrain, {
            "name": f"nightly-{model}",
            "schedule": Cron(NIGHTLY_CRON, timezone=timezone),
            "parameters": {"model": model},
            "description": f"Nightly retrain of {model} on the feedback it has not learned yet.",
            "tags": tags,
        }),
        (retrain, {
            "name": f"manual-{model}",
            "parameters": {"model": model},
            "description": f"Retrain {model} now (Run button in the UI, or `prefect deployment run`).",
            "tags": tags,
        }),
    ]  # fmt: skip
    if watch_every is not None:
        specs.append((watch_feedback, {
            "name": f"watch-{model}",
            "interval": watch_every,
            "parameters": {"model": model, "min_new_rows": WATCH_MIN_NEW_ROWS},
            "description": f"Every {watch_every}: start retrain/manual-{model} when {model} has enough new feedback.",
            "tags": tags,
        }))  # fmt: skip
    return specs


def build_deployments(model: str, timezone: str = "UTC", watch_every: timedelta | None = None) -> list[RunnerDeployment]:
    """The nightly and the manual deployment of `retrain` for one model, and its watcher if `watch_every`.

    The entry point is the installed module (`flows.retrain.retrain`), not a file path relative to
    the directory serve was started from: runs find the flow wherever serve runs.
    """
    # `_sync=True`: these Prefect methods return a coroutine instead of their result when the caller
    # has an event loop running in its thread (a notebook, an async test, Playwright's sync API).
    return [
        flow.to_deployment(**spec, entrypoint_type=EntrypointType.MODULE_PATH, _sync=True)
        for flow, spec in _specs(model, timezone, watch_every)
    ]


def serve_deployments(model: str, timezone: str = "UTC", watch_every: timedelta | None = WATCH_EVERY) -> None:
    """Run the deployments from this process until it is stopped (Ctrl-C keeps the schedules active).

    `watch_every=None` serves no watcher: retrains then start only nightly or by hand.
    """
    serve(*build_deployments(model, timezone, watch_every), limit=SERVE_LIMIT, pause_on_shutdown=False)


def ensure_process_pool(pool: str) -> bool:
    """Create the process work pool `pool` with Prefect's default job template; False if it existed."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
            )
        except ObjectAlreadyExists:
            return False
    return True


def deploy_to_pool(model: str, pool: str, timezone: str = "UTC", watch_every: timedelta | None = None) -> list[UUID]:
    """Register the deployments on the process work pool `pool` (created if missing); returns their ids.

    The code is this project folder: each run first changes into PROJECT_ROOT (a pull step, so its
    `.env` applies), so workers run on hosts that have the project at this path, in this environment.
    """
    ensure_process_pool(pool)
    job_variables = {"env": {"TOKENIZERS_PARALLELISM": "false"}, "working_dir": str(PROJECT_ROOT)}
    ids = []
    for flow, spec in _specs(model, timezone, watch_every):
        entrypoint = f"{Path(inspect.getfile(flow.fn)).relative_to(PROJECT_ROOT)}:{flow.fn.__name__}"
        source = flow.from_source(source=str(PROJECT_ROOT), entrypoint=entrypoint, _sync=True)  # see build_deployments
        ids.append(
            source.deploy(
                **spec, work_pool_name=pool, job_variables=job_variables, print_next_steps=False, ignore_warnings=True,
                _sync=True,
            )  # fmt: skip
        )
    return ids
