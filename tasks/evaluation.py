"""Evaluation task: candidate and parent on the same eval snapshot. A crash becomes data for the gate."""

from __future__ import annotations

import traceback
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot
from incremental.evaluation import evaluate_pair
from incremental.gate import EvalScores
from incremental.modeling import Hardware, ResolvedBase
from incremental.settings import Settings
from tasks.registry import Parent


@task(name="evaluate-candidate", cache_policy=NO_CACHE)
def evaluate_candidate(
    settings: Settings,
    base: ResolvedBase,
    candidate_adapter: Path,
    parent: Parent,
    snapshot: DatasetSnapshot,
    config: RunConfig,
) -> tuple[EvalScores, EvalScores]:
    try:
        return evaluate_pair(
            base,
            Hardware.from_settings(settings),
            candidate_adapter,
            parent.adapter_dir,
            snapshot,
            max_length=config.train.max_length,
        )
    # Broad on purpose: whatever breaks evaluation (OOM, a bad adapter, a metric bug) must reach
    # the gate as a recorded reason, so the candidate is finalized as rejected, not lost.
    except Exception as error:  # noqa: BLE001
        get_run_logger().error("[INCREMENTAL] Evaluation failed:\n%s", traceback.format_exc())
        failed = EvalScores(snapshot.eval_snapshot_hash, 0, {}, error=f"{type(error).__name__}: {error}")
        return failed, failed
