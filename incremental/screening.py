"""Screening: before a run trains, the parent scores each new row and flags the suspect ones.

A row is suspect when its target is no more likely under its own meeting notes than under other
rows' notes (it does not follow from its notes), when its per-token NLL is an outlier against the
parent's NLL on unseen trusted rows of the same artifact type (robust z-score), or when its target
does not parse as the artifact type it claims to be. Knows nothing
about the database or holds: it returns the suspects with their reasons; the caller holds them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from incremental.artifacts import check_artifact
from incremental.config import ScreeningPolicy
from incremental.scoring import score_triples, triple_hash

__all__ = ["ScreenedRow", "ScreeningResult", "screen_rows"]

_MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation is 1.4826 MADs


@dataclass(frozen=True)
class ScreenedRow:
    id: str
    artifact_type: str
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
    cached: Mapping[str, tuple] | None = None,
) -> ScreeningResult:
    """Score `new` (id, artifact_type, prompt, target) with the parent; `reference` are unseen trusted rows.

    Partner notes come from the reference rows (other rows of the batch when there are none), chosen
    by content hash so the choice is fixed. Both rules compare a row with the parent's behaviour on
    reference rows of the same artifact type and need `min_reference_rows` of them; with fewer (in
    base mode there are none) that type is not screened.
    """
    started = time.perf_counter()
    rows = new.select(["id", "artifact_type", "prompt", "target"]).to_pylist()
    refs = reference.select(["id", "artifact_type", "prompt", "target"]).to_pylist()
    pool = sorted(refs if refs else rows, key=lambda r: triple_hash(r["artifact_type"], r["prompt"], r["target"]))

    def partners_of(row: dict) -> list[str]:
        own_hash = triple_hash(row["artifact_type"], row["prompt"], row["target"])
        chosen: list[str] = []
        for candidate in _rotated(pool, own_hash):
            if candidate["prompt"] != row["prompt"] and candidate["prompt"] not in chosen:
                chosen.append(candidate["prompt"])
                if len(chosen) == policy.partners:
                    break
        return chosen

    triples = []
    for row in rows + refs:
        triples.append((row["artifact_type"], row["prompt"], row["target"]))
        triples.extend((row["artifact_type"], notes, row["target"]) for notes in partners_of(row))
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
        z = _robust_z(own, ref_nll, policy.min_reference_rows)
        reasons = []
        # Only where the parent demonstrably reads the notes for this type: a parent that does not
        # (a base model, say) gives clean rows a gain around zero too, and the rule would hold them.
        reads_notes = ref_gain.size >= policy.min_reference_rows and float(np.median(ref_gain)) > policy.min_prompt_gain
        if gain is not None and reads_notes and gain <= policy.min_prompt_gain:
            reasons.append(
                f"its target is no more likely under its own notes than under other notes "
                f"(prompt gain {gain:+.3f} nats/token, needs > {policy.min_prompt_gain:g}; "
                f"unseen trusted {task} rows: median {float(np.median(ref_gain)):+.3f})"
            )
        if policy.check_format:
            check = check_artifact(task, row["target"])
            if not check.valid:
                reasons.append(f"its target does not parse as {task}: {check.problem}")
        if z is not None and z > policy.max_nll_z:
            reasons.append(
                f"its NLL {own:.3f} nats/token is {z:.1f} robust SDs above the parent's on unseen {task} rows (max {policy.max_nll_z:g})"
            )
        screened.append(ScreenedRow(row["id"], task, own, gain, z, "; ".join(reasons) or None))
    return ScreeningResult(tuple(screened), scores, len(refs), round(time.perf_counter() - started, 2))


def _rotated(pool: list[dict], after_hash: str) -> list[dict]:
    """The pool in hash order, starting after `after_hash`: a fixed partner for each row."""
    hashes = [triple_hash(p["artifact_type"], p["prompt"], p["target"]) for p in pool]
    start = int(np.searchsorted(np.array(hashes), after_hash, side="right")) if hashes else 0
    return pool[start:] + pool[:start]


def _robust_z(value: float, reference: np.ndarray, min_rows: int) -> float | None:
    if reference.size < min_rows:
        return None
    median = float(np.median(reference))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(reference - median)))
    if spread <= 0:
        return None
    return (value - median) / spread
