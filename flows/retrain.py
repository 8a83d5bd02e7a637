"""The retraining loop as a Prefect flow: collect → dataset → train → evaluate → gate → finalize.

Wiring only: every step is a task over a library stage. The flow's parameters are pydantic models,
so the Prefect UI renders them as a form and validates them before the run starts.
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from incremental.config import RunConfig
from incremental.gate import EvalScores
from incremental.manifest import draft_manifest
from incremental.reporting import RunSummary
from incremental.settings import Settings
from tasks.dataset import build_dataset
from tasks.evaluation import evaluate_candidate
from tasks.feedback import collect_feedback, record_consumption, record_run
from tasks.gate import gate_candidate
from tasks.logs import library_logs_to_run_logger
from tasks.registry import finalize_version, release_version, reserve_version, resolve_parent
from tasks.report import publish_report
from tasks.training import prepare_base, train_candidate


@flow(name="retrain", description="Continue the current LoRA adapter on new feedback; promote it only if it does not regress.")
def retrain(model: str | None = None, config: RunConfig = RunConfig()) -> RunSummary:
    """One run of the loop for `model` (default: INCREMENTAL_MODEL)."""
    settings = Settings()
    model = model or settings.model
    run_id = str(flow_run.get_id() or uuid.uuid4())
    started = time.perf_counter()
    with library_logs_to_run_logger() as logger:
        # 1. The version to build on: the current accepted one, read from the folder tree.
        parent = resolve_parent(settings, model)
        # 2. Feedback this lineage has not learned yet.
        collected = collect_feedback(settings, model, parent.lineage)
        if collected.new.num_rows < config.data.min_new_rows:
            reason = (
                f"no new feedback for {model}: {collected.new.num_rows} new trainable rows "
                f"(need {config.data.min_new_rows}) since {parent.name or 'the base model'}"
            )
            logger.info("[INCREMENTAL] %s", reason)
            record_run(settings, run_id, model, status="skipped", reason=reason, parent=parent.name)
            summary = RunSummary(model=model, status="skipped", parent=parent.name, reasons=(reason,))
            publish_report(settings, summary)
            return summary

        # 3. The base model, and a reserved name for the candidate.
        base = prepare_base(settings, parent)
        reservation = reserve_version(settings, model, parent.name)
        logger.info("[INCREMENTAL] Training %s (builds on %s)", reservation.name, parent.name or "base model")
        record_run(settings, run_id, model, status="running", version=reservation.name, parent=parent.name)
        with tempfile.TemporaryDirectory(prefix=f"incremental-{model}-") as work_dir:
            try:
                # 4. New rows + replay for training; the frozen eval split for judging.
                snapshot = build_dataset(collected, config, Path(work_dir))
                # 5. Continue the parent's adapter (or start one) on the train split.
                training = train_candidate(settings, base, parent, snapshot, config, reservation.staging_dir)
            except BaseException as error:
                release_version(settings, model, reservation)
                record_run(settings, run_id, model, status="failed", reason=f"training failed: {error!r}",
                           version=reservation.name, parent=parent.name)  # fmt: skip
                raise
            # 6. Candidate and parent on the same eval snapshot.
            candidate_scores, parent_scores = evaluate_candidate(
                settings, base, reservation.staging_dir, parent, snapshot, config
            )
            # 7. The gate decides; it fails closed.
            decision = gate_candidate(candidate_scores, parent_scores, config.gate)
            # 8. Record what the candidate consumed, then make the version appear; promote by
            #    compare-and-swap only if the parent is still current.
            record_consumption(settings, model, reservation.name, snapshot)
            manifest = draft_manifest(
                name=reservation.name,
                model=model,
                parent=parent.name,
                created_at=reservation.created_at,
                base=base.ref,
                config=config,
                snapshot=snapshot,
                training=training,
                candidate_scores=candidate_scores,
                parent_scores=parent_scores,
                decision=decision,
            )
            result = finalize_version(settings, model, reservation, manifest)

        reasons = decision.reasons if result.promoted or not decision.accepted else (result.reason, *decision.reasons)
        summary = RunSummary(
            model=model,
            status="accepted" if result.promoted else "rejected",
            version=result.name,
            parent=parent.name,
            reasons=reasons,
            candidate_scores=_metrics(candidate_scores),
            parent_scores=_metrics(parent_scores),
            n_new=len(snapshot.new_ids),
            n_replay=len(snapshot.replay_ids),
            n_eval=len(snapshot.eval_ids),
            wall_seconds=round(time.perf_counter() - started, 1),
        )
        if result.promoted:
            logger.info("[INCREMENTAL] ✅ %s accepted: now current. Next training will build on: %s", result.name, result.name)
        else:
            logger.warning("[INCREMENTAL] ❌ %s rejected: %s. Current stays %s", result.name, reasons[0], parent.name or "base model")
        record_run(settings, run_id, model, status=summary.status, reason=reasons[0], version=result.name,
                   parent=parent.name, details={"scores": {"candidate": summary.candidate_scores,
                                                           "parent": summary.parent_scores}})  # fmt: skip
        publish_report(settings, summary)
        return summary


def _metrics(scores: EvalScores) -> dict[str, float | None]:
    """JSON-safe scores for the run record and summary; a NaN or inf is None (the gate's reasons name it)."""
    return {name: value if value is not None and math.isfinite(value) else None for name, value in scores.metrics.items()}
