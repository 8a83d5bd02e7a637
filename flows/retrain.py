"""The retraining loop as a Prefect flow: collect → screen → dataset → train → evaluate → gate → finalize.

Wiring only: every step is a task over a library stage. The flow's parameters are pydantic models,
so the Prefect UI renders them as a form and validates them before the run starts.

What the run list shows: one retrain per model at a time (`model_slot`: a waiting run is `Running`
named `AwaitingSlot`); an accepted run ends `Completed`, a rejected one `Completed` named `Rejected`,
a skipped one `Completed` named `Skipped`, and a failed one `Failed` with the stage that failed. A
run that fails before its version appears leaves nothing behind: no staging folder, no consumption
record, no held rows (`abandon-version`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow
from prefect.states import Completed, Failed, State

from flows.model_slot import OnBusy, model_slot
from incremental.config import ModelName, RunConfig
from incremental.evaluation import EvalResult
from incremental.feedback import CollectedFeedback
from incremental.manifest import draft_manifest
from incremental.recipe import fit_recipe
from incremental.registry import Reservation
from incremental.reporting import RunSummary, dataset_summary_rows
from incremental.settings import Settings
from incremental.waiting import tired_rows
from tasks.dataset import build_dataset
from tasks.evaluation import evaluate_candidate
from tasks.feedback import advance_learned_record, collect_feedback, hold_rows, record_consumption
from tasks.gate import gate_candidate
from tasks.logs import library_logs_to_run_logger
from tasks.registry import abandon_version, count_waits, finalize_version, release_version, reserve_version, resolve_parent
from tasks.report import publish_dataset_summary, publish_report
from tasks.screening import screen_new_rows
from tasks.training import prepare_base, train_candidate


@dataclass
class _Progress:
    """Where the run is: the stage now running (a failure names it), the version it reserved, and the
    wall time of each stage as the flow saw it (the task's work plus Prefect's bookkeeping for it)."""

    stage: str = "start"
    reservation: Reservation | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def call(self, task, *args, **kwargs):
        self.stage = task.name
        started = time.perf_counter()
        try:
            return task(*args, **kwargs)
        finally:
            self.seconds[task.name] = round(self.seconds.get(task.name, 0.0) + time.perf_counter() - started, 2)


@flow(name="retrain", description="Continue the current LoRA adapter on new feedback; promote it only if it does not regress.")
def retrain(
    model: ModelName | None = None,
    config: RunConfig = RunConfig(),
    on_busy: OnBusy = "wait",
    busy_timeout_minutes: float = 360.0,
) -> RunSummary:
    """One run of the loop for `model` (default: INCREMENTAL_MODEL). When another run holds the model's
    slot: `on_busy="wait"` waits up to `busy_timeout_minutes`, `"skip"` ends at once as Skipped."""
    settings = Settings()
    model = model or settings.model
    with library_logs_to_run_logger() as logger:
        with model_slot(model, on_busy, busy_timeout_minutes, logger) as busy:
            if busy is not None:
                logger.info("[INCREMENTAL] Skipped: %s", busy)
                summary = RunSummary(model=model, status="skipped", reasons=(busy,))
                _after_run(settings, summary, logger)
                return _final_state(summary)
            progress = _Progress()
            try:
                summary = _run(settings, model, config, progress, logger)
            except BaseException as error:
                return _failed(settings, model, progress, error, logger)
        _after_run(settings, summary, logger)
        return _final_state(summary)


def _run(settings: Settings, model: str, config: RunConfig, progress: _Progress, logger) -> RunSummary:
    started = time.perf_counter()
    call = progress.call
    # 1. The version to build on: the current accepted one, read from the folder tree.
    parent = call(resolve_parent, settings, model)
    # 2. Feedback this lineage has not learned yet; eval rows older than the parent are trusted.
    collected = call(collect_feedback, settings, model, parent.lineage, parent.accepted_at, config.data)
    if collected.new.num_rows < config.data.min_new_rows:
        return _skipped(model, parent.name, _nothing_new(model, collected, config, parent.name), logger)

    # 3. The base model, and a reserved name for the candidate.
    base = call(prepare_base, settings, parent)
    reservation = progress.reservation = call(reserve_version, settings, model, parent.name)
    screened: tuple[str, ...] = ()
    screened_types: list[str] = []
    screening_seconds = 0.0
    novel_ids: frozenset[str] | None = None  # rows new to the parent; None: not measured (screening off, no reference)
    with tempfile.TemporaryDirectory(prefix=f"incremental-{model}-") as work_dir:
        # 4. Screening: the parent scores the new rows; suspect ones are held, not trained.
        if config.gate.screening.enabled:
            screening = call(screen_new_rows, settings, base, parent, collected, config)
            screening_seconds = screening.wall_seconds
            novel_ids = screening.novel_ids if screening.novelty_measured else None
            if screening.suspects:
                call(hold_rows, settings, model, screening.suspects, actor="screening", version=reservation.name)
                screened = tuple(screening.suspects)
                screened_types = _types_of(screened, collected.new, collected.eval)
                collected = replace(collected, new=_without(collected.new, screened), eval=_without(collected.eval, screened))
            if collected.new.num_rows < config.data.min_new_rows:
                call(release_version, settings, model, reservation)
                progress.reservation = None
                reason = (
                    f"screening held {len(screened)} rows of the batch for {model} and "
                    f"{collected.new.num_rows} new train rows remain (need {config.data.min_new_rows}); "
                    "see `incremental feedback held`, release or exclude them"
                )
                return _skipped(model, parent.name, reason, logger, n_screened=len(screened))
        # 4b. A batch the parent finds new (a new domain, restyled corrections) trains with more replay
        #     and epochs, so that learning it does not make trusted rows worse; other nights as configured.
        novel = None if novel_ids is None else len(novel_ids.intersection(collected.new.column("id").to_pylist()))
        recipe = fit_recipe(config, novel, collected.new.num_rows)
        config = recipe.config
        logger.info(
            "[INCREMENTAL] Training %s (builds on %s), recipe: %s", reservation.name, parent.name or "base model", recipe.description
        )
        # 5. New rows + replay for training; eval rows (trusted / arrived with the batch) for judging.
        snapshot = call(build_dataset, settings, collected, config, Path(work_dir))
        call(publish_dataset_summary, model, reservation.name, dataset_summary_rows(collected, snapshot, screened_types), recipe.description)
        # 6. Continue the parent's adapter (or start one) on the train split.
        training = call(train_candidate, settings, base, parent, snapshot, config, reservation.staging_dir)
        # 7. Candidate and parent on the same eval snapshot, per example (a crash becomes the gate's evidence).
        evaluated = call(
            evaluate_candidate, settings, model, base, reservation.staging_dir, reservation.name, parent, snapshot, config
        )
        evidence = evaluated.evidence if isinstance(evaluated, EvalResult) else evaluated
        # 8. The gate decides on trusted rows, with paired intervals; it fails closed.
        decision = call(gate_candidate, evidence, config.gate, reservation.name)
        # 9. Record what the candidate consumed; a batch the gate blames is held (before the
        #    version appears, so a crash in between cannot let it come back as new); then make
        #    the version appear and promote it by compare-and-swap only if the parent is still current.
        call(record_consumption, settings, model, reservation.name, snapshot)
        held: tuple[str, ...] = ()
        waiting: tuple[str, ...] = ()
        if decision.blames_batch:
            held = snapshot.new_ids + snapshot.arrived_with_batch_ids
            reason = f"batch of rejected {reservation.name}: {decision.reasons[0]}"
            call(hold_rows, settings, model, dict.fromkeys(held, reason), actor="gate", version=reservation.name)
            logger.warning("[INCREMENTAL] Held %d rows of the rejected batch until a person releases them", len(held))
        elif decision.undecided:
            # Not sure yet is not no: the rows come back as new next run, with what arrives meanwhile;
            # only rows that more evidence did not settle (waited max_waits times already) go to a person.
            waited = call(count_waits, settings, model, parent.name)
            held = tired_rows(snapshot.new_ids, Counter(waited), config.gate.max_waits)
            if held:
                reason = (
                    f"waited through {config.gate.max_waits + 1} undecided candidates of "
                    f"{parent.name or 'the base model'} (last {reservation.name}: {decision.reasons[0]})"
                )
                call(hold_rows, settings, model, dict.fromkeys(held, reason), actor="gate", version=reservation.name)
                logger.warning("[INCREMENTAL] Held %d rows that more evidence did not settle", len(held))
            waiting = tuple(row_id for row_id in snapshot.new_ids if row_id not in set(held))
            logger.info(
                "[INCREMENTAL] Not sure yet: %d new rows wait for more evidence; the next run trains on them with what arrives",
                len(waiting),
            )
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
            prompt_layout=parent.prompt_layout,
            screened_ids=screened,
            held_ids=held,
            evaluation=cost,
            eval_window=collected.window_record(),
            new_by_generating_version=collected.new_by_generating_version(),
            recipe=recipe.description,
        )
        result = call(finalize_version, settings, model, reservation, manifest)
        progress.reservation = None  # the version exists now: nothing to undo

    reasons = decision.reasons if result.promoted or not decision.accepted else (result.reason, *decision.reasons)
    if result.promoted:
        logger.info("[INCREMENTAL] ✅ %s accepted: now current. Next training will build on: %s", result.name, result.name)
    else:
        logger.warning("[INCREMENTAL] ❌ %s rejected: %s. Current stays %s", result.name, reasons[0], result.current or "base model")
    return RunSummary(
        model=model,
        status="accepted" if result.promoted else "rejected",
        version=result.name,
        parent=parent.name,
        lineage=(result.name, *parent.lineage) if result.promoted else parent.lineage,
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
        n_waiting=len(waiting),
        evaluation=cost,
        wall_seconds=round(time.perf_counter() - started, 1),
        stage_seconds=dict(progress.seconds),
        training=training.model_dump(include={"steps", "tokens_per_second", "pad_per_real_token", "mfu", "peak_flops"}),
    )


def _after_run(settings: Settings, summary: RunSummary, logger) -> None:
    """Bookkeeping after the decision, which cannot change it: a failure here is a warning, not a failed run."""
    steps = [(publish_report, (settings, summary))]
    if summary.status == "accepted":
        # Idempotent; if it does not run, the next collect brings the learned record up to date itself.
        steps.insert(0, (advance_learned_record, (settings, summary.model, summary.lineage)))
    for task, args in steps:
        try:
            task(*args)
        except Exception as error:  # noqa: BLE001 - the version and the pointer are already right
            logger.warning("[INCREMENTAL] %s failed after the decision (%s: %s); the run's outcome stands", task.name, type(error).__name__, error)


def _final_state(summary: RunSummary) -> State:
    """Accepted runs end Completed; rejected and skipped ones Completed with their own name, so the run
    list tells them apart. Calling the flow from Python still returns the RunSummary."""
    name = {"accepted": None, "rejected": "Rejected", "skipped": "Skipped"}[summary.status]
    return Completed(name=name, message=summary.headline(), data=summary) if name else Completed(message=summary.headline(), data=summary)


def _failed(settings: Settings, model: str, progress: _Progress, error: BaseException, logger) -> State:
    """Undo what the run wrote for a version that never appeared, then fail naming the stage."""
    message = f"stage {progress.stage} failed: {type(error).__name__}: {error}"
    logger.error("[INCREMENTAL] %s", message)
    if progress.reservation is not None:
        try:
            abandon_version(settings, model, progress.reservation, reason=f"the run of {progress.reservation.name} failed at stage {progress.stage}")
        except BaseException as cleanup:  # the run's own error is the one to report; doctor finds the leftover
            logger.error("[INCREMENTAL] Could not undo %s (%s); `incremental doctor --repair` cleans it up", progress.reservation.name, cleanup)
    if not isinstance(error, Exception):
        raise error  # Ctrl-C, cancellation: after the cleanup, let Prefect record it as it is
    return Failed(message=message, data=error)


def _nothing_new(model: str, collected: CollectedFeedback, config: RunConfig, parent: str | None) -> str:
    held = f"; {collected.held.num_rows} rows are held (see `incremental feedback held`)" if collected.held.num_rows else ""
    return (
        f"no new feedback for {model}: {collected.new.num_rows} new trainable rows "
        f"(need {config.data.min_new_rows}) since {parent or 'the base model'}{held}"
    )


def _skipped(model: str, parent: str | None, reason: str, logger, n_screened: int = 0) -> RunSummary:
    logger.info("[INCREMENTAL] %s", reason)
    return RunSummary(model=model, status="skipped", parent=parent, reasons=(reason,), n_screened=n_screened)


def _types_of(ids: tuple[str, ...], *tables: pa.Table) -> list[str]:
    """The artifact type of each id found in `tables` (for the dataset summary's screened column)."""
    wanted = pa.array(ids, pa.string())
    return [t for table in tables for t in table.filter(pc.is_in(table.column("id"), wanted)).column("artifact_type").to_pylist()]


def _without(table: pa.Table, ids: tuple[str, ...]) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(ids, pa.string()))))


def _finite(scores: dict[str, float | None]) -> dict[str, float | None]:
    """JSON-safe scores for the run record and summary; a NaN or inf is None (the gate's reasons name it)."""
    return {name: value if value is not None and math.isfinite(value) else None for name, value in scores.items()}
