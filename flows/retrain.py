"""The retraining loop as a Prefect flow: collect → screen → dataset → train → evaluate → gate → finalize.

Wiring only: every step is a task over a library stage. The flow's parameters are pydantic models,
so the Prefect UI renders them as a form and validates them before the run starts.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from incremental.config import RunConfig
from incremental.evaluation import EvalResult
from incremental.feedback import CollectedFeedback
from incremental.manifest import draft_manifest
from incremental.reporting import RunSummary
from incremental.settings import Settings
from tasks.dataset import build_dataset
from tasks.evaluation import evaluate_candidate
from tasks.feedback import advance_learned_record, collect_feedback, hold_rows, record_consumption
from tasks.gate import gate_candidate
from tasks.logs import library_logs_to_run_logger
from tasks.registry import finalize_version, release_version, reserve_version, resolve_parent
from tasks.report import publish_report
from tasks.screening import screen_new_rows
from tasks.training import prepare_base, train_candidate


@flow(name="retrain", description="Continue the current LoRA adapter on new feedback; promote it only if it does not regress.")
def retrain(model: str | None = None, config: RunConfig = RunConfig()) -> RunSummary:
    """One run of the loop for `model` (default: INCREMENTAL_MODEL)."""
    settings = Settings()
    model = model or settings.model
    started = time.perf_counter()
    with library_logs_to_run_logger() as logger:
        # 1. The version to build on: the current accepted one, read from the folder tree.
        parent = resolve_parent(settings, model)
        # 2. Feedback this lineage has not learned yet; eval rows older than the parent are trusted.
        collected = collect_feedback(settings, model, parent.lineage, parent.accepted_at, config.data)
        if collected.new.num_rows < config.data.min_new_rows:
            return _skip(settings, model, parent.name, _nothing_new(model, collected, config, parent.name), logger)

        # 3. The base model, and a reserved name for the candidate.
        base = prepare_base(settings, parent)
        reservation = reserve_version(settings, model, parent.name)
        screened: tuple[str, ...] = ()
        screening_seconds = 0.0
        with tempfile.TemporaryDirectory(prefix=f"incremental-{model}-") as work_dir:
            try:
                # 4. Screening: the parent scores the new rows; suspect ones are held, not trained.
                if config.gate.screening.enabled:
                    screening = screen_new_rows(settings, base, parent, collected, config)
                    screening_seconds = screening.wall_seconds
                    if screening.suspects:
                        hold_rows(settings, model, screening.suspects, actor="screening", version=reservation.name)
                        screened = tuple(screening.suspects)
                        collected = replace(
                            collected, new=_without(collected.new, screened), eval=_without(collected.eval, screened)
                        )
                    if collected.new.num_rows < config.data.min_new_rows:
                        release_version(settings, model, reservation)
                        reason = (
                            f"screening held {len(screened)} rows of the batch for {model} and "
                            f"{collected.new.num_rows} new train rows remain (need {config.data.min_new_rows}); "
                            "see `incremental feedback held`, release or exclude them"
                        )
                        return _skip(settings, model, parent.name, reason, logger, n_screened=len(screened))
                logger.info("[INCREMENTAL] Training %s (builds on %s)", reservation.name, parent.name or "base model")
                # 5. New rows + replay for training; eval rows (trusted / arrived with the batch) for judging.
                snapshot = build_dataset(settings, collected, config, Path(work_dir))
                # 6. Continue the parent's adapter (or start one) on the train split.
                training = train_candidate(settings, base, parent, snapshot, config, reservation.staging_dir)
            except BaseException:
                release_version(settings, model, reservation)
                raise
            # 7. Candidate and parent on the same eval snapshot, per example.
            evaluated = evaluate_candidate(
                settings, model, base, reservation.staging_dir, reservation.name, parent, snapshot, config
            )
            evidence = evaluated.evidence if isinstance(evaluated, EvalResult) else evaluated
            # 8. The gate decides on trusted rows, with paired intervals; it fails closed.
            decision = gate_candidate(evidence, config.gate, reservation.name)
            # 9. Record what the candidate consumed; a batch the gate blames is held (before the
            #    version appears, so a crash in between cannot let it come back as new); then make
            #    the version appear and promote it by compare-and-swap only if the parent is still current.
            record_consumption(settings, model, reservation.name, snapshot)
            held: tuple[str, ...] = ()
            if decision.blames_batch:
                held = snapshot.new_ids + snapshot.arrived_with_batch_ids
                reason = f"batch of rejected {reservation.name}: {decision.reasons[0]}"
                hold_rows(settings, model, dict.fromkeys(held, reason), actor="gate", version=reservation.name)
                logger.warning("[INCREMENTAL] Held %d rows of the rejected batch until a person releases them", len(held))
            scores = evaluated.aggregates() if isinstance(evaluated, EvalResult) else {"candidate": {}, "parent": {}}
            cost = (
                {"parent_scored": evaluated.parent_scored, "parent_cached": evaluated.parent_cached,
                 "wall_seconds": evaluated.wall_seconds, "screening_seconds": screening_seconds}
                if isinstance(evaluated, EvalResult) else {"screening_seconds": screening_seconds}
            )  # fmt: skip
            manifest = draft_manifest(
                name=reservation.name,
                model=model,
                parent=parent.name,
                created_at=reservation.created_at,
                base=base.ref,
                config=config,
                snapshot=snapshot,
                training=training,
                scores=scores,
                decision=decision,
                screened_ids=screened,
                held_ids=held,
                evaluation=cost,
                eval_window=collected.window_record(),
            )
            result = finalize_version(settings, model, reservation, manifest)

        reasons = decision.reasons if result.promoted or not decision.accepted else (result.reason, *decision.reasons)
        summary = RunSummary(
            model=model,
            status="accepted" if result.promoted else "rejected",
            version=result.name,
            parent=parent.name,
            reasons=reasons,
            candidate_scores=_finite(scores["candidate"]),
            parent_scores=_finite(scores["parent"]),
            n_new=len(snapshot.new_ids),
            n_replay=len(snapshot.replay_ids),
            n_eval=len(snapshot.eval_ids),
            verdict=decision.verdict.value,
            checks=tuple(check.as_record() for check in decision.checks),
            n_screened=len(screened),
            n_held=len(held),
            evaluation=cost,
            wall_seconds=round(time.perf_counter() - started, 1),
        )
        if result.promoted:
            advance_learned_record(settings, model, (result.name, *parent.lineage))
            logger.info("[INCREMENTAL] ✅ %s accepted: now current. Next training will build on: %s", result.name, result.name)
        else:
            logger.warning("[INCREMENTAL] ❌ %s rejected: %s. Current stays %s", result.name, reasons[0], parent.name or "base model")
        publish_report(settings, summary)
        return summary


def _nothing_new(model: str, collected: CollectedFeedback, config: RunConfig, parent: str | None) -> str:
    held = f"; {collected.held.num_rows} rows are held (see `incremental feedback held`)" if collected.held.num_rows else ""
    return (
        f"no new feedback for {model}: {collected.new.num_rows} new trainable rows "
        f"(need {config.data.min_new_rows}) since {parent or 'the base model'}{held}"
    )


def _skip(settings: Settings, model: str, parent: str | None, reason: str, logger, n_screened: int = 0) -> RunSummary:
    logger.info("[INCREMENTAL] %s", reason)
    summary = RunSummary(model=model, status="skipped", parent=parent, reasons=(reason,), n_screened=n_screened)
    publish_report(settings, summary)
    return summary


def _without(table: pa.Table, ids: tuple[str, ...]) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(ids, pa.string()))))


def _finite(scores: dict[str, float | None]) -> dict[str, float | None]:
    """JSON-safe scores for the run record and summary; a NaN or inf is None (the gate's reasons name it)."""
    return {name: value if value is not None and math.isfinite(value) else None for name, value in scores.items()}
