"""Score a candidate adapter and its parent on the same eval snapshot, per example, for the gate.

Each eval row belongs to one slice: `regression` (trusted: arrived before the parent was accepted),
`new` (arrived with the batch), `golden` (a user's file), or `all` for a first version, which has no
trusted rows. Per example it computes target NLL, prompt gain (own notes against a fixed partner's
notes), the preference margin of corrections over rejected outputs, the NLL of rejected outputs and,
on a bounded greedy sample, artifact validity and content F1. The parent's scores come from a cache
where possible. Knows nothing about thresholds (the gate) or the database (the caller passes the cache).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from incremental import layout
from incremental.artifacts import check_artifact, content_f1
from incremental.config import GatePolicy
from incremental.dataset import DatasetSnapshot
from incremental.gate import ALL, GOLDEN, NEW, REGRESSION, GateEvidence, PairedScores, judged_slices
from incremental.modeling import Hardware, ResolvedBase, load_scoring_model
from incremental.scoring import Triple, generate_greedy, partner_notes, partner_pool, score_triples, scorer_id, triple_hash
from incremental.statistics import weighted_mean

__all__ = [
    "EvalPlan", "EvalResult", "ModelScores", "ScoreCache", "evaluate_candidate", "evaluate_pair",
    "evidence_from_table", "plan_evaluation", "plan_for",
]  # fmt: skip

log = logging.getLogger("incremental")

SCORE_COLUMNS = ("id", "artifact_type", "slice", "metric", "candidate", "parent", "weight")


@dataclass(frozen=True)
class EvalPlan:
    """What to score: the eval rows with their slices and prompt-gain partners, and the generation sample."""

    rows: pa.Table  # id, artifact_type, prompt, target, rejected_output, kind, slice, partner_notes
    generation_ids: tuple[str, ...]
    first_version: bool
    snapshot_hash: str

    def triples(self) -> list[Triple]:
        """Every (task, notes, target) a model must be scored on."""
        out: list[Triple] = []
        for row in self.rows.to_pylist():
            task, notes = row["artifact_type"], row["prompt"]
            out.append((task, notes, row["target"]))
            if row["kind"] == "target":
                out.extend((task, partner, row["target"]) for partner in row["partner_notes"])
                if row["rejected_output"] is not None:
                    out.append((task, notes, row["rejected_output"]))
        return out

    def generation_prompts(self) -> dict[str, tuple[str, str]]:
        """{prompt hash: (task, notes)} of the generation sample."""
        wanted = set(self.generation_ids)
        return {
            triple_hash(row["artifact_type"], row["prompt"], ""): (row["artifact_type"], row["prompt"])
            for row in self.rows.to_pylist()
            if row["id"] in wanted
        }


@dataclass(frozen=True)
class ModelScores:
    """One model's raw scores: {triple hash: (nll_sum, n_tokens)} and {prompt hash: greedy text}."""

    nll: dict[str, tuple[float, int]]
    generations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    evidence: GateEvidence
    table: pa.Table  # per example and metric: id, slice, metric, candidate, parent, weight
    candidate: ModelScores
    parent: ModelScores
    parent_scored: int  # parent triples and generations computed in this run (the rest came from the cache)
    parent_cached: int
    wall_seconds: float

    def aggregates(self) -> dict[str, dict[str, float | None]]:
        """Weighted means per model on the judged slice, for the version table."""
        return aggregate_scores(self.table, judged_slices(self.evidence.first_version)[0])


def plan_evaluation(
    snapshot_eval: pa.Table, *, first_version: bool, snapshot_hash: str, generation_rows: int, partners_per_row: int = 4
) -> EvalPlan:
    """Assign slices, pick each target row's partner notes, and choose the generation sample.

    Prompt gain scores every target under the notes of the same few partner rows: the oldest
    trusted eval rows (`snapshot_eval` comes oldest first), then the rest. The trusted set only
    grows, so the partners stay the same from run to run and the parent's scores stay cached;
    averaging over several partners keeps the luck of one partner's notes (same domain or not)
    out of the per-example prompt gain. The generation sample is the oldest `generation_rows`
    judged target rows, stable from run to run too.
    """
    rows = snapshot_eval.to_pylist()
    for row in rows:
        if row["slice"] != GOLDEN:
            row["slice"] = ALL if first_version else (REGRESSION if row["trusted"] else NEW)
    targets = [r for r in rows if r["kind"] == "target"]
    trusted_first = [r for r in targets if r["slice"] in (REGRESSION, GOLDEN)] + [r for r in targets if r["slice"] in (NEW, ALL)]
    pool = partner_pool([r["prompt"] for r in trusted_first], partners_per_row)
    for row in targets:
        row["partner_notes"] = partner_notes(pool, row["prompt"], partners_per_row)
    judged = judged_slices(first_version)
    sample = generation_sample(targets, judged, generation_rows)
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "artifact_type": [r["artifact_type"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "target": [r["target"] for r in rows],
            "rejected_output": [r.get("rejected_output") for r in rows],
            "kind": [r["kind"] for r in rows],
            "slice": [r["slice"] for r in rows],
            # A row without partners (a single distinct note) gets no prompt gain.
            "partner_notes": [r.get("partner_notes") or [] for r in rows],
        },
        schema=pa.schema(
            [(name, pa.string()) for name in ("id", "artifact_type", "prompt", "target", "rejected_output", "kind", "slice")]
            + [("partner_notes", pa.list_(pa.string()))]
        ),
    )
    return EvalPlan(rows=table, generation_ids=tuple(sample), first_version=first_version, snapshot_hash=snapshot_hash)


def generation_sample(targets: Sequence[dict], judged: Sequence[str], per_type: int) -> list[str]:
    """Ids of the judged target rows generated for validity and content F1: the oldest `per_type` of each
    artifact type (so every type can be judged on its own, and the parent's generations stay cached)."""
    taken: dict[str, int] = {}
    sample = []
    for row in targets:
        if row["slice"] in judged and taken.get(row["artifact_type"], 0) < per_type:
            taken[row["artifact_type"]] = taken.get(row["artifact_type"], 0) + 1
            sample.append(row["id"])
    return sample


def plan_for(snapshot: DatasetSnapshot, policy: GatePolicy, *, first_version: bool) -> EvalPlan:
    """The evaluation plan of a written snapshot under a gate policy."""
    return plan_evaluation(
        snapshot.read_eval(), first_version=first_version, snapshot_hash=snapshot.eval_snapshot_hash,
        generation_rows=policy.generation_rows, partners_per_row=policy.prompt_gain_partners,
    )  # fmt: skip


def score_model(
    model, tokenizer, plan: EvalPlan, *, max_length: int, max_new_tokens: int, prompt_layout: int, cached: ModelScores | None = None
) -> tuple[ModelScores, int]:
    """A model's scores on the plan, prompts in `prompt_layout`; returns them and how many it computed (the rest were cached)."""
    cached = cached or ModelScores({}, {})
    triples = plan.triples()
    nll = score_triples(model, tokenizer, triples, max_length=max_length, prompt_layout=prompt_layout, cached=cached.nll)
    prompts = plan.generation_prompts()
    missing = [h for h in prompts if h not in cached.generations]
    texts = generate_greedy(model, tokenizer, [prompts[h] for h in missing], max_new_tokens=max_new_tokens, prompt_layout=prompt_layout)
    generations = {h: cached.generations[h] for h in prompts if h in cached.generations} | dict(zip(missing, texts))
    computed = len(nll.keys() - cached.nll.keys()) + len(missing)
    return ModelScores(nll=nll, generations=generations), computed


def evaluate_pair(
    base: ResolvedBase,
    hardware: Hardware,
    candidate_adapter: Path,
    parent_adapter: Path | None,
    snapshot: DatasetSnapshot,
    *,
    policy: GatePolicy,
    max_length: int,
    prompt_layout: int,
    parent_cache: ModelScores | None = None,
    plan: EvalPlan | None = None,
) -> EvalResult:
    """Candidate and parent scored on one loaded base, on the identical snapshot, with the lineage's
    `prompt_layout` (a candidate keeps its parent's).

    The parent is another named adapter on the same base, or the bare base (adapter disabled)
    when the candidate is the first version. `plan` is `plan_for(snapshot, ...)`, when the caller
    already made it to look up the parent's cached scores.
    """
    started = time.perf_counter()
    first_version = parent_adapter is None
    plan = plan or plan_for(snapshot, policy, first_version=first_version)
    adapters = {"candidate": candidate_adapter} | ({} if parent_adapter is None else {"parent": parent_adapter})
    model, tokenizer = load_scoring_model(base, hardware, adapters)
    model.set_adapter("candidate")
    settings = {"max_length": max_length, "max_new_tokens": policy.max_new_tokens, "prompt_layout": prompt_layout}
    candidate, _ = score_model(model, tokenizer, plan, **settings)
    if parent_adapter is None:
        with model.disable_adapter():
            parent, computed = score_model(model, tokenizer, plan, **settings)
    else:
        model.set_adapter("parent")
        parent, computed = score_model(model, tokenizer, plan, **settings, cached=parent_cache)
    table = per_example_table(plan, candidate, parent)
    total = len(parent.nll) + len(parent.generations)
    return EvalResult(
        evidence=evidence_from_table(table, snapshot.eval_snapshot_hash, first_version),
        table=table,
        candidate=candidate,
        parent=parent,
        parent_scored=computed,
        parent_cached=total - computed,
        wall_seconds=round(time.perf_counter() - started, 2),
    )


class ScoreCache(Protocol):
    """Where finished versions' per-example scores are kept between runs (the feedback store)."""

    def cached_scores(self, model: str, version: str, scorer: str, hashes: Sequence[str]) -> dict[str, tuple]: ...

    def cache_scores(self, model: str, version: str, scorer: str, entries: Mapping[str, tuple]) -> None: ...


def evaluate_candidate(
    base: ResolvedBase,
    hardware: Hardware,
    *,
    model_name: str,
    candidate_dir: Path,
    candidate_name: str,
    parent_name: str | None,
    parent_adapter: Path | None,
    snapshot: DatasetSnapshot,
    policy: GatePolicy,
    max_length: int,
    prompt_layout: int,
    cache: ScoreCache,
) -> EvalResult | GateEvidence:
    """The evaluation stage, failing closed: candidate and parent scored on the same snapshot, the
    parent from `cache` where possible, `scores.parquet` written beside the candidate's adapter, both
    models' scores cached for later runs.

    When anything breaks (out of memory, a bad adapter, a metric bug) the result is a `GateEvidence`
    carrying the error instead of an exception: the gate rejects on it, and the candidate is finalized
    as rejected with that reason, not lost.
    """
    scorers = (
        nll_scorer(hardware, max_length, prompt_layout),
        generation_scorer(hardware, max_length, policy.max_new_tokens, prompt_layout),
    )
    try:
        plan = plan_for(snapshot, policy, first_version=parent_name is None)
        parent_cache = None
        if parent_name is not None:
            nll = cache.cached_scores(model_name, parent_name, scorers[0], [triple_hash(*t) for t in plan.triples()])
            texts = cache.cached_scores(model_name, parent_name, scorers[1], list(plan.generation_prompts()))
            parent_cache = ModelScores(nll={h: v[:2] for h, v in nll.items()}, generations={h: v[2] for h, v in texts.items()})
        result = evaluate_pair(
            base, hardware, candidate_dir, parent_adapter, snapshot,
            policy=policy, max_length=max_length, prompt_layout=prompt_layout, parent_cache=parent_cache, plan=plan,
        )  # fmt: skip
        pq.write_table(result.table, candidate_dir / layout.SCORES)
    # Broad on purpose: whatever breaks evaluation must reach the gate as a recorded reason.
    except Exception as error:  # noqa: BLE001
        log.error("[INCREMENTAL] Evaluation failed:\n%s", traceback.format_exc())
        return GateEvidence(snapshot.eval_snapshot_hash, parent_name is None, {}, error=f"{type(error).__name__}: {error}")
    # Both models' scores are kept: the candidate, once accepted, is the next run's parent.
    for version, scores in ((parent_name, result.parent), (candidate_name, result.candidate)):
        if version is None:
            continue
        cache.cache_scores(model_name, version, scorers[0], {h: (*v, None) for h, v in scores.nll.items()})
        cache.cache_scores(model_name, version, scorers[1], {h: (None, None, text) for h, text in scores.generations.items()})
    log.info(
        "[INCREMENTAL] Evaluated in %.1f s: %d parent scores computed, %d from the cache",
        result.wall_seconds, result.parent_scored, result.parent_cached,
    )  # fmt: skip
    return result


def per_example_table(plan: EvalPlan, candidate: ModelScores, parent: ModelScores) -> pa.Table:
    """One row per (example, metric): the values the gate's bootstrap resamples, for both models."""
    columns: dict[str, list] = {name: [] for name in SCORE_COLUMNS}

    def add(row_id: str, task: str, slice_: str, metric: str, cand: float, par: float, weight: float) -> None:
        for name, value in zip(SCORE_COLUMNS, (row_id, task, slice_, metric, cand, par, weight)):
            columns[name].append(value)

    def per_token(scores: ModelScores, task: str, notes: str, target: str) -> tuple[float, int]:
        nll, n = scores.nll[triple_hash(task, notes, target)]
        return (nll / n if n else float("nan")), n

    sample = set(plan.generation_ids)
    for row in plan.rows.to_pylist():
        task, notes, target, slice_ = row["artifact_type"], row["prompt"], row["target"], row["slice"]
        emit = functools.partial(add, row["id"], task, slice_)
        if row["kind"] == "rejected":
            (c_out, n_out), (p_out, _) = per_token(candidate, task, notes, target), per_token(parent, task, notes, target)
            emit("rejected_nll", c_out, p_out, n_out)
            continue
        (c_own, n_own), (p_own, _) = per_token(candidate, task, notes, target), per_token(parent, task, notes, target)
        emit("target_nll", c_own, p_own, n_own)
        if row["partner_notes"]:
            c_other = np.mean([per_token(candidate, task, partner, target)[0] for partner in row["partner_notes"]])
            p_other = np.mean([per_token(parent, task, partner, target)[0] for partner in row["partner_notes"]])
            emit("prompt_gain", float(c_other - c_own), float(p_other - p_own), n_own)
        if row["rejected_output"] is not None:
            c_rej, _ = per_token(candidate, task, notes, row["rejected_output"])
            p_rej, _ = per_token(parent, task, notes, row["rejected_output"])
            emit("preference_margin", c_rej - c_own, p_rej - p_own, n_own)
        if row["id"] in sample:
            key = triple_hash(task, notes, "")
            reference = check_artifact(task, target).names
            checks = [check_artifact(task, scores.generations[key]) for scores in (candidate, parent)]
            emit("artifact_validity", float(checks[0].valid), float(checks[1].valid), 1.0)
            emit("content_f1", content_f1(checks[0].names, reference), content_f1(checks[1].names, reference), 1.0)
    schema = pa.schema(
        [("id", pa.string()), ("artifact_type", pa.string()), ("slice", pa.string()), ("metric", pa.string()),
         ("candidate", pa.float64()), ("parent", pa.float64()), ("weight", pa.float64())]
    )  # fmt: skip
    return pa.table(columns, schema=schema)


def evidence_from_table(table: pa.Table, snapshot_hash: str, first_version: bool) -> GateEvidence:
    """The gate's input from a per-example table (as stored in a version folder): a verdict can be recomputed."""
    scores: dict[tuple[str, str], PairedScores] = {}
    for (metric, slice_), group in _groups(table).items():
        scores[(metric, slice_)] = PairedScores(
            ids=tuple(group.column("id").to_pylist()),
            candidate=group.column("candidate").to_numpy(zero_copy_only=False),
            parent=group.column("parent").to_numpy(zero_copy_only=False),
            weights=group.column("weight").to_numpy(zero_copy_only=False),
            # Tables written before per-type guardrails have no artifact_type: judged pooled only.
            types=tuple(group.column("artifact_type").to_pylist()) if "artifact_type" in group.column_names else None,
        )
    return GateEvidence(snapshot_hash=snapshot_hash, first_version=first_version, scores=scores)


def aggregate_scores(table: pa.Table, slice_: str) -> dict[str, dict[str, float | None]]:
    """{'candidate': {metric: weighted mean}, 'parent': {...}} on one slice."""
    result: dict[str, dict[str, float | None]] = {"candidate": {}, "parent": {}}
    for (metric, found_slice), group in _groups(table).items():
        if found_slice != slice_:
            continue
        weights = group.column("weight").to_numpy(zero_copy_only=False)
        for role in ("candidate", "parent"):
            value = weighted_mean(group.column(role).to_numpy(zero_copy_only=False), weights)
            result[role][metric] = value if np.isfinite(value) else None
    return result


def _groups(table: pa.Table) -> dict[tuple[str, str], pa.Table]:
    groups = {}
    for metric in sorted(set(table.column("metric").to_pylist())):
        by_metric = table.filter(pc.equal(table.column("metric"), metric))
        for slice_ in sorted(set(by_metric.column("slice").to_pylist())):
            groups[(metric, slice_)] = by_metric.filter(pc.equal(by_metric.column("slice"), slice_))
    return groups


def nll_scorer(hardware: Hardware, max_length: int, prompt_layout: int) -> str:
    return scorer_id("nll", max_length=max_length, quantization=hardware.quantization, device=hardware.device, **_layout_key(prompt_layout))


def generation_scorer(hardware: Hardware, max_length: int, max_new_tokens: int, prompt_layout: int) -> str:
    return scorer_id(
        "greedy", max_length=max_length, max_new_tokens=max_new_tokens, quantization=hardware.quantization,
        device=hardware.device, **_layout_key(prompt_layout),
    )  # fmt: skip


def _layout_key(prompt_layout: int) -> dict:
    # Layout 1 was the only one when scores were first cached: leaving it out of the id keeps those
    # caches valid; any other layout scores different text, so it is part of the id.
    return {} if prompt_layout == 1 else {"prompt_layout": prompt_layout}
