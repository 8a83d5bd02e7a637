"""Dataset task: new rows + bounded replay for training, eval rows (and a golden file) for judging, frozen as Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot, plan_dataset, read_golden
from incremental.feedback import CollectedFeedback
from incremental.settings import Settings


@task(name="build-dataset", cache_policy=NO_CACHE)
def build_dataset(settings: Settings, collected: CollectedFeedback, config: RunConfig, work_dir: Path) -> DatasetSnapshot:
    golden = read_golden(settings.golden_path) if settings.golden_path else None
    plan = plan_dataset(
        collected.new, collected.learned, collected.eval, collected.rejected, config.data, seed=config.train.seed, golden=golden
    )
    return plan.write(work_dir)
