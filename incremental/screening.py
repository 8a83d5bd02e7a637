"""Screening: before a run trains, the parent scores each new row and flags the suspect ones.

A row is suspect when its target is no more likely under its own meeting notes than under other
rows' notes (it does not follow from its notes), when its per-token NLL is an outlier against the
parent's NLL on unseen trusted rows of the same artifact type (robust z-score), or when its target
does not parse as the artifact type it claims to be. When a source's batch has far more suspects than
a clean batch shows, its unflagged rows are held with it (acceptance sampling). Knows nothing
about the database or holds: it returns the suspects with their reasons; the caller holds them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from incremental.artifacts import check_artifact
from incremental.config import ScreeningPolicy
from incremental.scoring import partner_notes, partner_pool, score_triples, triple_hash
from incremental.statistics import binomial_tail

__all__ = ["ScreenedRow", "ScreeningResult", "hold_bad_lots", "screen_rows", "suspect_reason"]

_MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation is 1.4826 MADs


@dataclass(frozen=True)
class ScreenedRow:
    id: str
    artifact_type: str
    source: str
    nll: float  # per token, under its own notes
    prompt_gain: float | None  # per token: NLL under partner notes minus under own notes
    nll_z: float | None  # robust z against unseen trusted rows of the type; None without enough of them
    reason: str | None  # why it is suspect; None when it is not


@dataclass(frozen=True)
class ScreeningResult:
    rows: tuple[ScreenedRow, ...]
    scores: dict[str, tuple[float, int]]  # {triple hash: (nll_sum, n_tokens)}, for the cache
    n_reference: int
    wall_seconds: float

    @property
    def suspects(self) -> dict[str, str]:
        return {row.id: row.reason for row in self.rows if row.reason is not None}


def screen_rows(
    model,
    tokenizer,
    new: pa.Table,
    reference: pa.Table,
    policy: ScreeningPolicy,
    *,
    max_length: int,
    partners: int = 4,
    cached: Mapping[str, tuple] | None = None,
) -> ScreeningResult:
    """Score `new` (id, artifact_type, prompt, target, source) with the parent; `reference` are unseen trusted rows.

    Partner notes are the oldest reference rows' (the batch's own when there are none), as in
    evaluation, so scores are shared through the cache. The model-based rules compare a row with
    the parent's behaviour on reference rows of the same artifact type and need `min_reference_rows`
    of them; with fewer (in base mode there are none) only the format rule screens that type.
    """
    started = time.perf_counter()
    rows = new.select(["id", "artifact_type", "prompt", "target", "source"]).to_pylist()
    refs = reference.select(["id", "artifact_type", "prompt", "target"]).to_pylist()
    partners_of = _partner_function(rows, refs, partners)
    triples = screening_triples(new, reference, partners)
    scores = score_triples(model, tokenizer, triples, max_length=max_length, cached=cached)

    def per_token(task: str, notes: str, target: str) -> float:
        nll, n = scores[triple_hash(task, notes, target)]
        return nll / n if n else float("nan")

    def measure(row: dict) -> tuple[float, float | None]:
        task, target = row["artifact_type"], row["target"]
        own = per_token(task, row["prompt"], target)
        partners = partners_of(row)
        gain = float(np.mean([per_token(task, notes, target) for notes in partners]) - own) if partners else None
        return own, gain

    # The parent's behaviour on unseen trusted rows of each type is what a clean new row looks like.
    reference_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for task in sorted({r["artifact_type"] for r in refs}):
        measured = [measure(r) for r in refs if r["artifact_type"] == task]
        reference_stats[task] = (
            np.array([own for own, _ in measured]),
            np.array([gain for _, gain in measured if gain is not None]),
        )
    screened = []
    for row in rows:
        task = row["artifact_type"]
        own, gain = measure(row)
        ref_nll, ref_gain = reference_stats.get(task, (np.array([]), np.array([])))
        reason = suspect_reason(task, row["target"], own, gain, ref_nll, ref_gain, policy)
        z = _robust_z(own, ref_nll, policy.min_reference_rows)
        screened.append(ScreenedRow(row["id"], task, row["source"], own, gain, z, reason))
    return ScreeningResult(tuple(hold_bad_lots(screened, policy)), scores, len(refs), round(time.perf_counter() - started, 2))


def screening_triples(new: pa.Table, reference: pa.Table, partners: int = 4) -> list[tuple[str, str, str]]:
    """Every (task, notes, target) screening scores: each row under its own notes and its partners'."""
    columns = ["artifact_type", "prompt", "target"]
    rows, refs = new.select(columns).to_pylist(), reference.select(columns).to_pylist()
    partners_of = _partner_function(rows, refs, partners)
    triples = []
    for row in rows + refs:
        triples.append((row["artifact_type"], row["prompt"], row["target"]))
        triples.extend((row["artifact_type"], notes, row["target"]) for notes in partners_of(row))
    return triples


def _partner_function(rows: list[dict], refs: list[dict], partners: int):
    # The same partners as evaluation uses (the oldest trusted rows), so the scores are shared
    # through the cache: the reference rows' were computed when the parent was evaluated.
    pool = partner_pool([r["prompt"] for r in (refs if refs else rows)], partners)
    return lambda row: partner_notes(pool, row["prompt"], partners)


def suspect_reason(
    task: str, target: str, nll: float, gain: float | None, reference_nll: np.ndarray, reference_gain: np.ndarray,
    policy: ScreeningPolicy,
) -> str | None:
    """Why one row is suspect, or None: the rules, given the parent's per-token NLL and prompt gain on
    the row and on unseen trusted rows of its type."""
    reasons = []
    # Only where the parent demonstrably reads the notes for this type: a parent that does not
    # (a base model, say) gives clean rows a gain around zero too, and the rule would hold them.
    reads_notes = reference_gain.size >= policy.min_reference_rows and float(np.median(reference_gain)) > policy.min_prompt_gain
    if gain is not None and reads_notes and gain <= policy.min_prompt_gain:
        reasons.append(
            f"its target is no more likely under its own notes than under other notes "
            f"(prompt gain {gain:+.3f} nats/token, needs > {policy.min_prompt_gain:g}; "
            f"unseen trusted {task} rows: median {float(np.median(reference_gain)):+.3f})"
        )
    if policy.check_format:
        check = check_artifact(task, target)
        if not check.valid:
            reasons.append(f"its target does not parse as {task}: {check.problem}")
    z = _robust_z(nll, reference_nll, policy.min_reference_rows)
    if z is not None and z > policy.max_nll_z:
        reasons.append(
            f"its NLL {nll:.3f} nats/token is {z:.1f} robust SDs above the parent's on unseen {task} rows (max {policy.max_nll_z:g})"
        )
    return "; ".join(reasons) or None


def hold_bad_lots(rows: list[ScreenedRow], policy: ScreeningPolicy) -> list[ScreenedRow]:
    """Acceptance sampling per source: the rules catch most bad rows, not all, so when a source's batch
    has far more suspects than a clean batch shows, its unflagged rows are held with it."""
    by_source: dict[str, list[ScreenedRow]] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row)
    out = []
    for source, lot in by_source.items():
        flagged = sum(1 for row in lot if row.reason is not None)
        p_value = binomial_tail(flagged, len(lot), policy.clean_suspect_share) if flagged else 1.0
        if p_value >= policy.lot_p_value:
            out.extend(lot)
            continue
        why = (
            f"held with its batch from source {source!r}: {flagged} of {len(lot)} rows are suspect, far more than the "
            f"{policy.clean_suspect_share:.0%} a clean batch shows (p = {p_value:.1e})"
        )
        out.extend(row if row.reason is not None else replace(row, reason=why) for row in lot)
    return out


def _robust_z(value: float, reference: np.ndarray, min_rows: int) -> float | None:
    if reference.size < min_rows:
        return None
    median = float(np.median(reference))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(reference - median)))
    if spread <= 0:
        return None
    return (value - median) / spread
