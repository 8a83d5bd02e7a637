"""Dataset task: new rows + bounded replay for training, held-out rows for evaluation, frozen as Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot, plan_dataset
from incremental.feedback import CollectedFeedback


@task(name="build-dataset", cache_policy=NO_CACHE)
def build_dataset(collected: CollectedFeedback, config: RunConfig, work_dir: Path) -> DatasetSnapshot:
    plan = plan_dataset(
        collected.new, collected.learned, collected.eval, collected.rejected, config.data, seed=config.train.seed
    )
    return plan.write(work_dir)
