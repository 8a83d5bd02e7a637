"""Evaluation task: candidate and parent on the same eval snapshot, the parent's scores from the cache
where possible, per-example scores written beside the adapter. A crash becomes data for the gate."""

from __future__ import annotations

import traceback
from pathlib import Path

import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from incremental import layout
from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot
from incremental.evaluation import EvalResult, ModelScores, evaluate_pair, generation_scorer, nll_scorer, plan_for
from incremental.gate import GateEvidence
from incremental.modeling import Hardware, ResolvedBase
from incremental.scoring import triple_hash
from incremental.settings import Settings
from tasks.feedback import open_store
from tasks.registry import Parent


@task(name="evaluate-candidate", cache_policy=NO_CACHE)
def evaluate_candidate(
    settings: Settings,
    model_name: str,
    base: ResolvedBase,
    candidate_dir: Path,
    candidate_name: str,
    parent: Parent,
    snapshot: DatasetSnapshot,
    config: RunConfig,
) -> EvalResult | GateEvidence:
    """An `EvalResult`, or a `GateEvidence` carrying the error when evaluation crashed."""
    hardware = Hardware.from_settings(settings)
    max_length, policy = config.train.max_length, config.gate
    scorers = (nll_scorer(hardware, max_length), generation_scorer(hardware, max_length, policy.max_new_tokens))
    store = open_store(settings)
    try:
        plan = plan_for(snapshot, policy, first_version=parent.name is None)
        cache = None
        if parent.name is not None:
            nll = store.cached_scores(model_name, parent.name, scorers[0], [triple_hash(*t) for t in plan.triples()])
            texts = store.cached_scores(model_name, parent.name, scorers[1], list(plan.generation_prompts()))
            cache = ModelScores(nll={h: v[:2] for h, v in nll.items()}, generations={h: v[2] for h, v in texts.items()})
        result = evaluate_pair(
            base, hardware, candidate_dir, parent.adapter_dir, snapshot,
            policy=policy, max_length=max_length, parent_cache=cache, plan=plan,
        )  # fmt: skip
        pq.write_table(result.table, candidate_dir / layout.SCORES)
    # Broad on purpose: whatever breaks evaluation (OOM, a bad adapter, a metric bug) must reach
    # the gate as a recorded reason, so the candidate is finalized as rejected, not lost.
    except Exception as error:  # noqa: BLE001
        get_run_logger().error("[INCREMENTAL] Evaluation failed:\n%s", traceback.format_exc())
        return GateEvidence(snapshot.eval_snapshot_hash, parent.name is None, {}, error=f"{type(error).__name__}: {error}")
    # Both models' scores are kept: the candidate, once accepted, is the next run's parent.
    for version, scores in ((parent.name, result.parent), (candidate_name, result.candidate)):
        if version is None:
            continue
        store.cache_scores(model_name, version, scorers[0], {h: (*v, None) for h, v in scores.nll.items()})
        store.cache_scores(model_name, version, scorers[1], {h: (None, None, text) for h, text in scores.generations.items()})
    get_run_logger().info(
        "[INCREMENTAL] Evaluated in %.1f s: %d parent scores computed, %d from the cache",
        result.wall_seconds, result.parent_scored, result.parent_cached,
    )
    return result
