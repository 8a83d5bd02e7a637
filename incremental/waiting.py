"""Rows that wait for more evidence: an undecided candidate's batch comes back as new in the next run.

When the gate keeps the parent because its evidence is not strong enough either way (an interval that
straddles a margin), nothing is held: the candidate is not in the lineage, so its new rows are new
again and the next run trains on them together with what arrived since. This module counts, from the
version manifests alone, how many undecided candidates of one parent already trained each row, so a
row that more data did not settle is held for a person instead of waiting forever. Knows nothing
about the database or the flow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from incremental.registry import VersionInfo

__all__ = ["Waiting", "times_waited", "tired_rows", "waiting_rows"]


def times_waited(versions: Iterable[VersionInfo], parent: str | None) -> Counter[str]:
    """How many finished, undecided (inconclusive, not promoted) candidates built on `parent` trained
    each row as new. A new parent starts the count again: its evidence is new."""
    counts: Counter[str] = Counter()
    for version in versions:
        manifest = version.manifest
        if manifest is None or manifest.parent != parent or manifest.gate.verdict != "inconclusive":
            continue
        counts.update(set(manifest.data.new_ids) - set(manifest.gate.held_ids))  # held rows wait for a person
    return counts


def tired_rows(ids: Sequence[str], waited: Counter[str], max_waits: int) -> tuple[str, ...]:
    """The rows of `ids` that had already waited `max_waits` times before this undecided verdict."""
    return tuple(row_id for row_id in ids if waited[row_id] >= max_waits)


@dataclass(frozen=True)
class Waiting:
    """Rows that undecided candidates of the current version trained and no hold took since: the next
    run trains on them again. `since` is when the first of those candidates was finalized."""

    ids: frozenset[str]
    since: datetime | None


def waiting_rows(versions: Iterable[VersionInfo], parent: str | None) -> Waiting:
    """What waits for more evidence now, from the manifests of `parent`'s undecided candidates."""
    trained: set[str] = set()
    held: set[str] = set()
    since: datetime | None = None
    for version in versions:
        manifest = version.manifest
        if manifest is None or manifest.parent != parent:
            continue
        held.update(manifest.gate.held_ids)
        if manifest.gate.verdict == "inconclusive":
            trained.update(manifest.data.new_ids)
            when = manifest.finalized_at
            since = when if since is None or (when is not None and when < since) else since
    waiting = frozenset(trained - held)
    return Waiting(waiting, since if waiting else None)
