"""Rows that wait for more evidence: counting, from the manifests, how often an undecided candidate of
the same parent already trained each row, and which rows more evidence did not settle."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from incremental.registry import VersionInfo
from incremental.waiting import times_waited, tired_rows


def version(name: str, parent: str | None, verdict: str, new_ids: tuple[str, ...], held_ids: tuple[str, ...] = ()) -> VersionInfo:
    manifest = SimpleNamespace(parent=parent, gate=SimpleNamespace(verdict=verdict, held_ids=held_ids), data=SimpleNamespace(new_ids=new_ids))
    return VersionInfo(name=name, number=int(name[1]), path=Path(name), manifest=manifest, is_current=False)


VERSIONS = [
    version("v1", None, "accept", ("a", "b")),
    version("v2", "v1", "inconclusive", ("c", "d")),
    version("v3", "v1", "inconclusive", ("c", "d", "e"), held_ids=("d",)),  # d waited too long: held then
    version("v4", "v1", "reject", ("f",)),  # a failed rule holds its batch: it does not wait
    version("v5", "v0", "inconclusive", ("g",)),  # another parent's evidence
]


def test_only_undecided_candidates_of_the_same_parent_count():
    assert times_waited(VERSIONS, "v1") == Counter({"c": 2, "d": 1, "e": 1})
    assert times_waited(VERSIONS, "v0") == Counter({"g": 1})
    assert times_waited(VERSIONS, None) == Counter()


def test_a_version_with_an_unreadable_manifest_is_skipped():
    broken = VersionInfo(name="v6", number=6, path=Path("v6"), manifest=None, is_current=False, problems=("unreadable",))
    assert times_waited([*VERSIONS, broken], "v1") == Counter({"c": 2, "d": 1, "e": 1})


def test_rows_that_waited_max_waits_times_already_are_tired():
    waited = times_waited(VERSIONS, "v1")
    assert tired_rows(("c", "d", "e", "h"), waited, 2) == ("c",)
    assert tired_rows(("c", "d", "e", "h"), waited, 1) == ("c", "d", "e")
    assert tired_rows(("c", "h"), waited, 0) == ("c", "h")  # max_waits 0: an undecided batch goes to a person at once


def test_waiting_rows_are_those_no_later_hold_took_with_the_first_undecided_time():
    from datetime import UTC, datetime

    from incremental.waiting import waiting_rows

    def at(version: VersionInfo, hour: int) -> VersionInfo:
        version.manifest.finalized_at = datetime(2026, 12, 1, hour, tzinfo=UTC)
        return version

    versions = [at(v, i) for i, v in enumerate(VERSIONS)]
    waiting = waiting_rows(versions, "v1")
    assert waiting.ids == {"c", "e"} and waiting.since == datetime(2026, 12, 1, 1, tzinfo=UTC)  # d: held by v3; f: a rejected batch, held
    assert waiting_rows(versions, "v9").ids == frozenset() and waiting_rows(versions, "v9").since is None
