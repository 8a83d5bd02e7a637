"""Evaluation task: the library's fail-closed evaluation stage, with the feedback store as the score cache."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot
from incremental.evaluation import EvalResult
from incremental.evaluation import evaluate_candidate as evaluate_candidate_stage
from incremental.gate import GateEvidence
from incremental.modeling import Hardware, ResolvedBase
from incremental.registry import ParentVersion
from incremental.settings import Settings
from incremental.threads import apply_threads
from tasks.feedback import open_store


@task(name="evaluate-candidate", cache_policy=NO_CACHE)
def evaluate_candidate(
    settings: Settings,
    model_name: str,
    base: ResolvedBase,
    candidate_dir: Path,
    candidate_name: str,
    parent: ParentVersion,
    snapshot: DatasetSnapshot,
    config: RunConfig,
) -> EvalResult | GateEvidence:
    """An `EvalResult`, or a `GateEvidence` carrying the error when evaluation crashed."""
    apply_threads(settings)
    return evaluate_candidate_stage(
        base,
        Hardware.from_settings(settings),
        model_name=model_name,
        candidate_dir=candidate_dir,
        candidate_name=candidate_name,
        parent_name=parent.name,
        parent_adapter=parent.adapter_dir,
        snapshot=snapshot,
        policy=config.gate,
        max_length=config.train.max_length,
        prompt_layout=parent.prompt_layout,
        cache=open_store(settings),
    )
