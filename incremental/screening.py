"""Screening: before a run trains, the parent scores each new row and flags the ones that look wrong.

A row is held for what makes it wrong, never for being new (DESIGN invariant 10). The rules, each
named at the start of its reason so that held rows group by rule:
- `format`: its target does not parse as the artifact type it claims to be;
- `ungrounded`: most names its target declares (entities, fields) appear nowhere in its own notes;
- `incomplete`: its target leaves out most of the names its notes mention that artifacts use as names
  (the vocabulary of the trusted reference rows' and the batch's targets);
- `no prompt gain`: its target is no more likely under its own notes than under other rows' notes
  (it does not follow from its notes), where the parent demonstrably reads notes for that type and
  the row is familiar to it (a model cannot read names it never saw: measured, new-domain rows have
  a prompt gain around zero);
- `lot`: a lot (one rater's rows from one source) with far more flagged rows than a clean batch shows
  is held whole (acceptance sampling: the rules miss some bad rows of a bad lot).
Novelty, a per-token NLL far above the parent's on unseen trusted rows of the type, holds nothing by
itself: corrections are by definition what the parent does not do yet, and a new customer's names are
unlikely under a model that never saw them. A novel row is checked by its text instead (its names must
all be grounded in its notes), and the rows of a rater whose record shows bad feedback wait when novel.
Knows nothing about the database or holds: it returns the suspects with their reasons; the caller holds them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from incremental.artifacts import check_artifact
from incremental.config import ScreeningPolicy
from incremental.scoring import partner_notes, partner_pool, score_triples, triple_hash
from incremental.statistics import binomial_tail

__all__ = [
    "RULES",
    "RaterStanding",
    "ScreenedRow",
    "ScreeningResult",
    "covered_share",
    "grounded_share",
    "hold_bad_lots",
    "name_vocabulary",
    "rule_of",
    "screen_rows",
    "standing",
    "suspect_reason",
]

_MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation is 1.4826 MADs
FORMAT, UNGROUNDED, INCOMPLETE, NO_PROMPT_GAIN, NOVEL_UNGROUNDED, NOVEL_FROM_FLAGGED_RATER, LOT = (
    "format", "ungrounded", "incomplete", "no prompt gain", "novel and not fully grounded", "novel, from a flagged rater", "lot",
)  # fmt: skip
RULES = (FORMAT, UNGROUNDED, INCOMPLETE, NO_PROMPT_GAIN, NOVEL_UNGROUNDED, NOVEL_FROM_FLAGGED_RATER, LOT)
_MIN_MENTIONED = 3  # names a row's notes must mention before its coverage is judged


@dataclass(frozen=True)
class RaterStanding:
    """What screening knows of a rater from their record: rows of theirs a person excluded or the gate
    blamed, out of the rows of theirs that were settled. A rater with no record is neither trusted nor
    punished: `flagged` is False."""

    rater: str | None
    bad: int = 0
    settled: int = 0
    flagged: bool = False


@dataclass(frozen=True)
class ScreenedRow:
    id: str
    artifact_type: str
    source: str
    rater: str | None
    nll: float  # per token, under its own notes
    prompt_gain: float | None  # per token: NLL under partner notes minus under own notes
    nll_z: float | None  # robust z against unseen trusted rows of the type; None without enough of them
    grounded: float | None  # share of the target's declared names found in its notes; None if it declares none
    reason: str | None  # why it is suspect ("<rule>: <why>"); None when it is not

    @property
    def novel(self) -> bool:
        return self.reason is not None and rule_of(self.reason) in (NOVEL_UNGROUNDED, NOVEL_FROM_FLAGGED_RATER)


@dataclass(frozen=True)
class ScreeningResult:
    rows: tuple[ScreenedRow, ...]
    scores: dict[str, tuple[float, int]]  # {triple hash: (nll_sum, n_tokens)}, for the cache
    n_reference: int
    wall_seconds: float
    novel_ids: frozenset[str] = frozenset()  # rows above the novelty threshold (checked more strictly, not held for it)

    @property
    def n_novel(self) -> int:
        return len(self.novel_ids)

    @property
    def novelty_measured(self) -> bool:
        """Whether any row could be judged new or not: its type had min_reference_rows unseen trusted rows."""
        return any(row.nll_z is not None for row in self.rows)

    @property
    def suspects(self) -> dict[str, str]:
        return {row.id: row.reason for row in self.rows if row.reason is not None}

    def by_rule(self) -> dict[str, int]:
        """How many rows each rule held (the first rule of a row's reason)."""
        counts: dict[str, int] = {}
        for reason in self.suspects.values():
            counts[rule_of(reason)] = counts.get(rule_of(reason), 0) + 1
        return counts


def standing(record, policy: ScreeningPolicy) -> RaterStanding:
    """What screening takes from a rater's record (`FeedbackStore.rater_records`): rows of theirs a person
    excluded or the gate blamed, against those settled (released, excluded or blamed). A release is a
    person's word that rows were fine, so it cancels as many gate blames (the record keeps counts, not pairs)."""
    bad = record.excluded + max(0, record.blamed_by_gate - record.released)
    settled = record.released + bad
    flagged = bad >= policy.flag_rater_min_bad and bad >= policy.flag_rater_bad_share * settled
    return RaterStanding(record.rater, bad, settled, flagged)


def rule_of(reason: str) -> str:
    """The rule that held a row: its reason's text before the first ': '."""
    return reason.split(": ", 1)[0]


def screen_rows(
    model,
    tokenizer,
    new: pa.Table,
    reference: pa.Table,
    policy: ScreeningPolicy,
    *,
    max_length: int,
    prompt_layout: int,
    partners: int = 4,
    cached: Mapping[str, tuple] | None = None,
    raters: Mapping[str | None, RaterStanding] | None = None,
) -> ScreeningResult:
    """Score `new` (id, artifact_type, prompt, target, source and, if present, rater) with the parent,
    prompts in the parent's `prompt_layout`;
    `reference` are unseen trusted rows; `raters` is what is known of each rater (none: nothing).

    Partner notes are the oldest reference rows' (the batch's own when there are none), as in
    evaluation, so scores are shared through the cache. The model-based rules compare a row with
    the parent's behaviour on reference rows of the same artifact type and need `min_reference_rows`
    of them; with fewer (in base mode there are none) only the text rules (format, grounding) screen that type.
    """
    started = time.perf_counter()
    rows = new.select(["id", "artifact_type", "prompt", "target", "source"]).to_pylist()
    rater_column = new.column("rater").to_pylist() if "rater" in new.column_names else [None] * len(rows)
    refs = reference.select(["id", "artifact_type", "prompt", "target"]).to_pylist()
    partners_of = _partner_function(rows, refs, partners)
    triples = screening_triples(new, reference, partners)
    scores = score_triples(model, tokenizer, triples, max_length=max_length, prompt_layout=prompt_layout, cached=cached)

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
    vocabulary = name_vocabulary([(r["artifact_type"], r["target"]) for r in refs + rows])
    screened, novel_ids = [], set()
    for row, rater in zip(rows, rater_column):
        task = row["artifact_type"]
        own, gain = measure(row)
        ref_nll, ref_gain = reference_stats.get(task, (np.array([]), np.array([])))
        standing = (raters or {}).get(rater) or RaterStanding(rater)
        reason = suspect_reason(task, row["prompt"], row["target"], own, gain, ref_nll, ref_gain, policy, standing, vocabulary)
        z = _robust_z(own, ref_nll, policy.min_reference_rows)
        if z is not None and z > policy.max_nll_z:
            novel_ids.add(row["id"])
        share = grounded_share(task, row["target"], row["prompt"])
        screened.append(ScreenedRow(row["id"], task, row["source"], rater, own, gain, z, share, reason))
    return ScreeningResult(
        tuple(hold_bad_lots(screened, policy)), scores, len(refs), round(time.perf_counter() - started, 2), frozenset(novel_ids)
    )


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
    task: str,
    notes: str,
    target: str,
    nll: float,
    gain: float | None,
    reference_nll: np.ndarray,
    reference_gain: np.ndarray,
    policy: ScreeningPolicy,
    rater: RaterStanding | None = None,
    vocabulary: frozenset[str] = frozenset(),
) -> str | None:
    """Why one row is suspect ("<rule>: <why>", rules joined by '; '), or None: the rules, given the
    parent's per-token NLL and prompt gain on the row and on unseen trusted rows of its type, and the
    names artifacts use (`name_vocabulary`) for the coverage rule."""
    reasons = []
    if policy.check_format:
        check = check_artifact(task, target)
        if not check.valid:
            reasons.append(f"{FORMAT}: its target does not parse as {task}: {check.problem}")
    share = grounded_share(task, target, notes)
    if share is not None and share < policy.min_grounded_share:
        reasons.append(
            f"{UNGROUNDED}: {share:.0%} of the names its target declares appear in its notes "
            f"(needs {policy.min_grounded_share:.0%}): a target for other notes, or invented fields"
        )
    covered = covered_share(task, target, notes, vocabulary)
    if covered is not None and covered < policy.min_covered_share:
        reasons.append(
            f"{INCOMPLETE}: its target declares {covered:.0%} of the names its notes mention "
            f"(needs {policy.min_covered_share:.0%}): entities or fields left out"
        )
    z = _robust_z(nll, reference_nll, policy.min_reference_rows)
    novel = z is not None and z > policy.max_nll_z
    # Only where the parent demonstrably reads the notes for this type, and only for rows familiar to it:
    # it cannot copy names it never saw, so a new domain's rows show no gain either (measured:
    # BENCHMARKS.md). "Demonstrably" is this rule's own false-flag rate on the parent's unseen trusted
    # rows of the type (clean by definition): at most the clean_suspect_share the lot rule assumes.
    # A parent that reads notes weakly (a first version after one small night) gives many clean rows
    # a gain at or under zero: a median above zero let it flag 12 of 36 clean rows and hold their lot.
    reads_notes = (
        reference_gain.size >= policy.min_reference_rows
        and float(np.mean(reference_gain > policy.min_prompt_gain)) >= 1 - policy.clean_suspect_share
    )
    if gain is not None and reads_notes and not novel and gain <= policy.min_prompt_gain:
        reasons.append(
            f"{NO_PROMPT_GAIN}: its target is no more likely under its own notes than under other notes "
            f"(prompt gain {gain:+.3f} nats/token, needs > {policy.min_prompt_gain:g}, "
            f"unseen trusted {task} rows: median {float(np.median(reference_gain)):+.3f})"
        )
    if not reasons and novel:
        # Novel: the parent would not write this. That is what a correction or a new domain looks
        # like, so it holds nothing alone; it asks for every declared name to come from the notes,
        # and for a rater whose record shows bad feedback it is enough to wait for a person.
        novelty = f"its NLL {nll:.3f} nats/token is {z:.1f} robust SDs above the parent's on unseen {task} rows"
        if share is not None and share < 1.0:
            reasons.append(f"{NOVEL_UNGROUNDED}: {novelty}, and {share:.0%} of its names appear in its notes (novel rows need all)")
        elif rater is not None and rater.flagged:
            reasons.append(
                f"{NOVEL_FROM_FLAGGED_RATER}: {novelty}, and {rater.bad} of {rater.settled} settled rows of rater "
                f"{rater.rater!r} were excluded or blamed by the gate"
            )
    return "; ".join(reasons) or None


def name_vocabulary(artifacts: list[tuple[str, str]]) -> frozenset[str]:
    """Every name part (entity, field) the valid artifacts among (type, text) declare, lower-cased."""
    vocabulary: set[str] = set()
    for task, text in artifacts:
        for name in check_artifact(task, text).names:
            vocabulary.update(name.split("."))
    return frozenset(vocabulary)


def covered_share(task: str, target: str, notes: str, vocabulary: frozenset[str]) -> float | None:
    """Share of the names `notes` mention (words or joined word runs that `vocabulary` holds as artifact
    names) that `target` declares. None when the target does not parse or the notes mention fewer than
    three such names (too few to judge what is missing)."""
    check = check_artifact(task, target)
    if not check.valid:
        return None
    mentioned = {form for word in _joined_words(notes, 2) for form in _forms(word) if form in vocabulary}
    if len(mentioned) < _MIN_MENTIONED:
        return None
    declared = set().union(*(_forms(part) for name in check.names for part in name.split(".")))
    return len(mentioned & declared) / len(mentioned)


# Name parts that artifacts carry by convention whatever the notes say (keys, audit columns).
_CONVENTIONAL_WORDS = frozenset({"id", "ids", "uuid", "pk", "fk", "key", "created", "updated", "deleted", "at", "on", "by", "of"})
_WORD = re.compile(r"[a-z0-9]+")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def grounded_share(task: str, target: str, notes: str) -> float | None:
    """Share of the names `target` declares (entities, and fields without their entity) whose words all
    appear in `notes`, ignoring case, plural endings, camelCase/snake_case and conventional key or audit
    words ('id', 'created_at'). None when the target does not parse or declares no name."""
    check = check_artifact(task, target)
    if not check.valid:
        return None
    in_notes = set().union(*(_forms(word) for word in _joined_words(notes, 3)))
    names = {name.rsplit(".", 1)[-1] for name in check.names}
    judged = [parts for parts in ([w for w in _words(name) if w not in _CONVENTIONAL_WORDS] for name in names) if parts]
    if not judged:
        return None
    return sum(all(_forms(word) & in_notes for word in parts) for parts in judged) / len(judged)


def _words(text: str) -> list[str]:
    return _WORD.findall(_CAMEL_BOUNDARY.sub(" ", text).lower())


def _joined_words(text: str, longest: int) -> list[str]:
    """The words of `text` and the runs of up to `longest` of them joined: artifacts join words into
    one name ("OrderLine", "unitprice" once lower-cased)."""
    words = _words(text)
    return ["".join(words[i : i + k]) for k in range(1, longest + 1) for i in range(len(words) - k + 1)]


def _forms(word: str) -> set[str]:
    """A word and its singular guesses ('categories' -> 'category', 'boxes' -> 'box', 'books' -> 'book')."""
    forms = {word}
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if word.endswith("es"):
        forms.add(word[:-2])
    if word.endswith("s"):
        forms.add(word[:-1])
    return forms


def hold_bad_lots(rows: list[ScreenedRow], policy: ScreeningPolicy) -> list[ScreenedRow]:
    """Acceptance sampling per lot, one rater's rows from one source: the rules catch most bad rows, not
    all, so when a lot has far more suspects than a clean batch shows, its unflagged rows are held with
    it. Lots are per rater so that one careless or hostile rater's rows never hold anybody else's.

    Only rows flagged for what makes them wrong count. A flagged rater's novel rows wait, but they are not
    evidence against the lot: how many rows of a clean batch are new to the parent depends on the batch
    (0 to 15 % of clean batches from the demo's end state, all of a new domain's), not on the rater, so
    counting them held a flagged rater's whole clean batch for being new (8 novel rows of 54, p = 0.01)."""
    lots: dict[tuple[str, str | None], list[ScreenedRow]] = {}
    for row in rows:
        lots.setdefault((row.source, row.rater), []).append(row)
    out = []
    for (source, rater), lot in lots.items():
        # (A flagged rater's novel-row reason is only ever given alone: suspect_reason adds it when no rule fired.)
        flagged = sum(1 for row in lot if row.reason is not None and rule_of(row.reason) != NOVEL_FROM_FLAGGED_RATER)
        p_value = binomial_tail(flagged, len(lot), policy.clean_suspect_share) if flagged else 1.0
        if p_value >= policy.lot_p_value:
            out.extend(lot)
            continue
        who = f"rater {rater!r} from source {source!r}" if rater is not None else f"source {source!r} (no rater named)"
        why = (
            f"{LOT}: held with its batch from {who}: {flagged} of {len(lot)} rows are suspect, far more than the "
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
