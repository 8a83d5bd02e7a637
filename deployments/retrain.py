"""How the retrain flow is deployed: a nightly schedule and a manual ("Run" button) deployment.

Declarations only. Two ways to run them:
- `serve`: one long-running process on the training machine executes the runs (simplest; one
  GPU box). `limit=1` keeps it to one training at a time.
- `deploy_to_pool`: register the same deployments on a work pool whose workers run on GPU
  machines (`prefect worker start --pool <pool>`), e.g. a process pool per GPU host.
Both need a Prefect server (`prefect server start`): schedules never fire on the embedded API.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.retrain import retrain

# 03:30 rather than 02:30: in daylight-saving zones the 02:00-03:00 hour is skipped once a year.
NIGHTLY_CRON = "30 3 * * *"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# One retraining per deployment at a time; a run that collides waits for the slot.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build_deployments(model: str, timezone: str = "UTC"):
    """The nightly and the manual deployment of `retrain` for one model."""
    nightly = retrain.to_deployment(
        name=f"nightly-{model}",
        schedule=Cron(NIGHTLY_CRON, timezone=timezone),
        parameters={"model": model},
        concurrency_limit=ONE_AT_A_TIME,
        description=f"Nightly retrain of {model} on the feedback it has not learned yet.",
        tags=["incremental", model],
    )
    manual = retrain.to_deployment(
        name=f"manual-{model}",
        parameters={"model": model},
        concurrency_limit=ONE_AT_A_TIME,
        description=f"Retrain {model} now (Run button in the UI, or `prefect deployment run`).",
        tags=["incremental", model],
    )
    return nightly, manual


def serve_deployments(model: str, timezone: str = "UTC") -> None:
    """Run the deployments from this process until it is stopped (Ctrl-C keeps the schedule active)."""
    serve(*build_deployments(model, timezone), limit=1, pause_on_shutdown=False)


def deploy_to_pool(model: str, pool: str, timezone: str = "UTC") -> None:
    """Register the deployments on a work pool; workers on GPU hosts pick the runs up."""
    source = retrain.from_source(source=str(PROJECT_ROOT), entrypoint="flows/retrain.py:retrain")
    for deployment in build_deployments(model, timezone):
        source.deploy(
            name=deployment.name,
            work_pool_name=pool,
            schedules=deployment.schedules,
            parameters=deployment.parameters,
            concurrency_limit=ONE_AT_A_TIME,
            description=deployment.description,
            tags=deployment.tags,
            job_variables={"env": {"TOKENIZERS_PARALLELISM": "false"}, "working_dir": str(PROJECT_ROOT)},
        )
