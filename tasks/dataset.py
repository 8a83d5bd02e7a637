"""Dataset task: new rows + bounded replay for training, eval rows (and a golden file) for judging, frozen as Parquet."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot, plan_dataset, read_golden
from incremental.feedback import CollectedFeedback
from incremental.settings import Settings
from tasks.feedback import open_store


@task(name="build-dataset", cache_policy=NO_CACHE)
def build_dataset(settings: Settings, collected: CollectedFeedback, config: RunConfig, work_dir: Path) -> DatasetSnapshot:
    golden = read_golden(settings.golden_path) if settings.golden_path else None
    fetch_rows = partial(open_store(settings).rows, collected.model)
    plan = plan_dataset(collected, config.data, seed=config.train.seed, fetch_rows=fetch_rows, golden=golden)
    return plan.write(work_dir)
