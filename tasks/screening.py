"""Screening task: the parent scores the new rows before training; suspect rows are returned for holding."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.evaluation import nll_scorer
from incremental.feedback import CollectedFeedback
from incremental.modeling import Hardware, ResolvedBase, load_scoring_model
from incremental.registry import ParentVersion
from incremental.scoring import triple_hash
from incremental.screening import ScreeningResult, screen_rows, screening_triples, standing
from incremental.settings import Settings
from incremental.threads import apply_threads
from tasks.feedback import open_store


@task(name="screen-new-rows", cache_policy=NO_CACHE)
def screen_new_rows(settings: Settings, base: ResolvedBase, parent: ParentVersion, collected: CollectedFeedback, config: RunConfig) -> ScreeningResult:
    """One scoring pass of the parent (the base model in base mode) over the batch (new train rows and the eval
    rows that arrived with them) and the trusted eval rows it is compared with."""
    apply_threads(settings)
    hardware = Hardware.from_settings(settings)
    max_length = config.train.max_length
    reference = collected.eval.filter(pc.field("trusted"))
    store, scorer = open_store(settings), nll_scorer(hardware, max_length, parent.prompt_layout)
    cached = {}
    # The batch's own eval rows are screened too: held ones never become trusted evidence later.
    # Rows a person released are not screened again: the release is their decision (DESIGN invariant 5).
    columns = ["id", "artifact_type", "prompt", "target", "source", "rater"]
    arrived = collected.eval.filter(pc.invert(pc.field("trusted")))
    batch = pa.concat_tables(
        [collected.without_released(collected.new).select(columns), collected.without_released(arrived).select(columns)]
    )
    partners = config.gate.prompt_gain_partners
    if parent.name is not None:
        hashes = [triple_hash(*t) for t in screening_triples(batch, reference, partners)]
        cached = store.cached_scores(collected.model, parent.name, scorer, hashes)
    adapters = {} if parent.adapter_dir is None else {"parent": parent.adapter_dir}
    model, tokenizer = load_scoring_model(base, hardware, adapters)
    policy = config.gate.screening
    raters = {rater: standing(record, policy) for rater, record in store.rater_records(collected.model).items()}
    result = screen_rows(
        model, tokenizer, batch, reference, policy,
        max_length=max_length, prompt_layout=parent.prompt_layout, partners=partners, cached=cached, raters=raters,
    )  # fmt: skip
    if parent.name is not None:
        store.cache_scores(collected.model, parent.name, scorer, {h: (*v, None) for h, v in result.scores.items() if h not in cached})
    logger = get_run_logger()
    released = collected.new.num_rows + arrived.num_rows - batch.num_rows
    by_rule = ", ".join(f"{rule} {count}" for rule, count in result.by_rule().items())
    logger.info(
        "[INCREMENTAL] Screening: %d of %d new rows (train and eval) suspect%s; %d new to the parent, not held for that "
        "(%d trusted reference rows, %.1f s)%s",
        len(result.suspects), len(result.rows), f" ({by_rule})" if by_rule else "", result.n_novel, result.n_reference,
        result.wall_seconds, f"; {released} rows a person released are not screened again" if released else "",
    )  # fmt: skip
    for row_id, reason in list(result.suspects.items())[:10]:
        logger.info("[INCREMENTAL]   held %s: %s", row_id, reason)
    return result
