"""Check one model's `finetuned_models/<model>/` tree against the registry's invariants; repair what is safe.

`diagnose` only reads. `repair` applies the findings marked repairable, under the registry lock,
after checking that each still holds: it removes what dead runs left behind and rebuilds history
lines from the pointer. It never deletes or edits a finished version (desktop junk files are not
part of one), never points `current` at a version it did not name before, and never writes the
feedback database. Knows the tree and the registry; nothing of training or the gate.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from incremental import layout
from incremental.errors import IncrementalError, RegistryError
from incremental.registry import Registry, VersionInfo
from incremental.settings import EMBEDDED_BASE

__all__ = ["Finding", "Severity", "diagnose", "repair"]

Severity = Literal["error", "warning", "info"]
STALE_AFTER_S = 24 * 3600.0  # a reservation nobody touched for a day, on a host we cannot ask, is dead
TEMP_STALE_AFTER_S = 60.0  # a pointer is replaced within milliseconds
_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One thing out of line. `repair` applies `fix` itself when `repairable`; otherwise a person must."""

    severity: Severity
    what: str
    fix: str
    repairable: bool
    kind: str  # stable name of the check, e.g. "staging-dead", "history-missing-move"
    subject: str  # what it is about: a version, or a path inside the model folder
    root: Path  # the model folder, models_root/<model>


def diagnose(
    models_root: Path,
    model: str,
    db_path: Path | None = None,
    *,
    embedded_cache_dir: Path | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> list[Finding]:
    """Everything out of line in `models_root/model`, errors first; [] for a healthy tree.

    Hashes every version's files. With `db_path`, also compares each version's recorded training
    rows with its manifest; with `embedded_cache_dir`, also checks the embedded bases versions use.
    """
    registry = Registry(models_root, model)
    if not registry.root.is_dir():
        return []
    versions = registry.versions()
    findings = [
        *_staging(registry, stale_after_s),
        *_temp_files(registry),
        *_folders_without_manifest(registry),
        *_versions(registry, versions),
        *_pointer(registry, versions),
        *_history(registry, versions),
    ]
    if db_path is not None:
        findings += _ledger(registry, versions, Path(db_path))
    findings += _bases(registry, versions, embedded_cache_dir)
    return sorted(findings, key=lambda finding: _ORDER[finding.severity])


def repair(findings: Iterable[Finding], *, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Apply the repairable findings that still hold, under each registry's lock; one line per change made.

    `stale_after_s` must be what `diagnose` was given: a staging folder is removed only if it is still dead.
    """
    done: list[str] = []
    by_root: dict[Path, list[Finding]] = {}
    for finding in findings:
        if finding.repairable:
            by_root.setdefault(finding.root, []).append(finding)
    for root, items in by_root.items():
        registry = Registry(root.parent, root.name)
        with registry.lock():
            for finding in sorted(items, key=lambda item: _REPAIR_ORDER.index(item.kind)):
                line = _REPAIRS[finding.kind](registry, finding, stale_after_s)
                if line is not None:
                    done.append(line)
    return done


# ---- staging and leftovers ---------------------------------------------------------------------


def _finding(registry: Registry, severity: Severity, kind: str, subject: str, what: str, fix: str, repairable: bool) -> Finding:
    return Finding(severity=severity, what=what, fix=fix, repairable=repairable, kind=kind, subject=subject, root=registry.root)


def _read_owner(folder: Path) -> dict | None:
    try:
        owner = json.loads(layout.owner_file(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _last_change(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [entry.lstat().st_mtime for entry in folder.iterdir()]
    return max(times)


def _process_alive(pid: int, started_by: float) -> bool:
    """Whether process `pid` of this host exists and is old enough to have made a reservation at `started_by`."""
    import psutil  # deferred: only the doctor asks about processes

    try:
        process = psutil.Process(pid)
        # A process that started after the reservation reuses the number of the one that made it.
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started_by + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # it exists, and is not ours to inspect
        return True


def _staging_state(folder: Path, stale_after_s: float) -> tuple[Literal["live", "dead", "unknown"], str]:
    """Whether the run that reserved `folder` is still running, and why we think so."""
    age_h = (time.time() - _last_change(folder)) / 3600
    owner = _read_owner(folder)
    if owner is not None and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        pid, started_by = owner["pid"], float(owner.get("reserved_at", 0.0))
        if _process_alive(pid, started_by):
            return "live", f"process {pid} on this host, which reserved it, is running"
        return "dead", f"process {pid} on this host, which reserved it, has ended"
    who = f"reserved by process {owner.get('pid')} on {owner.get('host')}" if owner is not None else "no owner file"
    if age_h * 3600 > stale_after_s:
        return "dead", f"{who}; untouched for {age_h:.0f} h"
    return "unknown", f"{who}; last changed {age_h:.1f} h ago"


def _staging(registry: Registry, stale_after_s: float) -> list[Finding]:
    staging = registry.root / layout.STAGING_DIR
    if not staging.is_dir():
        return []
    findings = []
    for entry in sorted(staging.iterdir()):
        subject = f"{layout.STAGING_DIR}/{entry.name}"
        if layout.VERSION_NAME.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            state, why = _staging_state(entry, stale_after_s)
            if state == "live":
                what = f"{entry.name} is being built ({why})"
                findings.append(_finding(registry, "info", "staging-live", subject, what, "nothing to do", False))
            elif state == "dead":
                findings.append(
                    _finding(
                        registry, "warning", "staging-dead", subject,
                        f"{subject} was left by a run that died ({why}); it never became a version",
                        f"remove {subject} (its number may be handed out again)", True,
                    )
                )  # fmt: skip
            else:
                findings.append(
                    _finding(
                        registry, "warning", "staging-unknown", subject,
                        f"{subject} may belong to a run on another machine ({why})",
                        f"if no run is active, remove {subject} by hand; `doctor --repair` removes it once it is "
                        f"untouched for {stale_after_s / 3600:.0f} h", False,
                    )
                )  # fmt: skip
        elif entry.name.endswith(layout.OWNER_SUFFIX):
            if not entry.with_name(entry.name.removesuffix(layout.OWNER_SUFFIX)).exists():
                what = f"{subject} names a reservation that is gone"
                findings.append(_finding(registry, "info", "staging-orphan-owner", subject, what, f"remove {subject}", True))
        elif not layout.is_junk(entry.name):
            findings.append(
                _finding(
                    registry, "info", "staging-foreign", subject, f"{subject} was not made by the registry",
                    "look at it and remove it by hand; the registry never reads it", False,
                )
            )  # fmt: skip
    return findings


def _temp_files(registry: Registry) -> list[Finding]:
    findings = []
    for entry in sorted(registry.root.iterdir()):
        if layout.TEMP_FILE.match(entry.name) and entry.is_file() and time.time() - entry.lstat().st_mtime > TEMP_STALE_AFTER_S:
            findings.append(
                _finding(
                    registry, "info", "temp-file", entry.name,
                    f"{entry.name} is a replacement that a crash stopped before the rename; the file it was for is intact",
                    f"remove {entry.name}", True,
                )
            )  # fmt: skip
    return findings


def _folders_without_manifest(registry: Registry) -> list[Finding]:
    findings = []
    for entry in sorted(registry.root.iterdir()):
        if layout.VERSION_NAME.match(entry.name) and entry.is_dir() and not (entry / layout.MANIFEST).is_file():
            findings.append(
                _finding(
                    registry, "warning", "version-without-manifest", entry.name,
                    f"{entry.name} has no {layout.MANIFEST}: it is not a version (never listed or loaded) but holds its number. "
                    "finalize renames a folder only with its manifest inside, so it was made or emptied by hand, "
                    "or a crash lost a file the disk had not written yet",
                    f"restore {entry.name}/{layout.MANIFEST} from a backup, or move the folder out of {registry.root}", False,
                )
            )  # fmt: skip
    return findings


# ---- versions, pointer, history ----------------------------------------------------------------


def _healthy_fallback(versions: list[VersionInfo], exclude: str | None) -> str:
    """The newest accepted version without problems, as a rollback suggestion."""
    for info in reversed(versions):
        if info.name != exclude and not info.problems and info.manifest is not None and info.manifest.status == "accepted":
            return f"`incremental rollback {info.name}` (the newest healthy accepted version)"
    return "`incremental rollback base` (no healthy accepted version is left)"


def _versions(registry: Registry, versions: list[VersionInfo]) -> list[Finding]:
    findings = []
    current = next((info.name for info in versions if info.is_current), None)
    for info in versions:
        if info.problems:
            if info.is_current:
                findings.append(
                    _finding(
                        registry, "error", "version-damaged", info.name,
                        f"{info.name}, the current version, is damaged: {info.problem}. Serving and training refuse it",
                        f"{_healthy_fallback(versions, info.name)}, or restore its files from a backup", False,
                    )
                )  # fmt: skip
            else:
                findings.append(
                    _finding(
                        registry, "warning", "version-damaged", info.name, f"{info.name} is damaged: {info.problem}",
                        "nothing uses it while it is not current (rolling back to it is refused); "
                        "restore its files from a backup",
                        False,
                    )
                )  # fmt: skip
        if info.junk:
            findings.append(
                _finding(
                    registry, "info", "version-junk", info.name,
                    f"{info.name} holds {', '.join(info.junk)}, left by a desktop (ignored when loading)",
                    f"remove {', '.join(info.junk)} from {info.name}", True,
                )
            )  # fmt: skip
        if info.promotion_state == "interrupted":
            findings.append(
                _finding(
                    registry, "warning", "promotion-interrupted", info.name,
                    f"{info.name} was finalized to be promoted over {info.manifest.parent or 'the base model'}, but its run "
                    "stopped before the pointer moved: it is accepted and was never current",
                    f"nothing is broken: {current or 'the base model'} stays current and the next run builds on it. "
                    f"To use {info.name}, `incremental rollback {info.name}`", False,
                )
            )  # fmt: skip
    unhashed = [info.name for info in versions if info.manifest is not None and not info.manifest.files]
    if unhashed:
        findings.append(
            _finding(
                registry, "info", "version-unhashed", ", ".join(unhashed),
                f"{', '.join(unhashed)} predate file hashes in manifests: only their weights are checked",
                "nothing to do; versions finalized from now on record the hash of every file", False,
            )
        )  # fmt: skip
    return findings


def _pointer(registry: Registry, versions: list[VersionInfo]) -> list[Finding]:
    by_name = {info.name: info for info in versions}
    try:
        record = registry.pointer_record()
    except RegistryError as exc:
        entries, _ = registry.history_lines()
        last = entries[-1] if entries else None
        target = last.get("to") if last is not None else None
        restorable = last is not None and (target is None or (target in by_name and not by_name[target].problems))
        fix = (
            f"rewrite {layout.CURRENT_POINTER} from the last history entry (current: {target or 'the base model'})"
            if restorable
            else f"{_healthy_fallback(versions, None)} rewrites it"
        )
        return [_finding(registry, "error", "pointer-unreadable", layout.CURRENT_POINTER, str(exc), fix, restorable)]
    name = record["current"] if record is not None else None
    if name is None:
        return []
    if name not in by_name:
        return [
            _finding(
                registry, "error", "pointer-missing-version", layout.CURRENT_POINTER,
                f"the pointer names {name!r}, which is not a finished version: serving, status and runs fail",
                f"{_healthy_fallback(versions, name)} repairs the pointer", False,
            )
        ]  # fmt: skip
    info = by_name[name]
    if info.manifest is not None and info.manifest.status == "rejected":
        forced = any(entry.get("to") == name and entry.get("forced") for entry in registry.history())
        if not forced:
            return [
                _finding(
                    registry, "warning", "pointer-rejected", layout.CURRENT_POINTER,
                    f"the pointer names {name}, which the gate rejected, and no forced rollback put it there",
                    f"{_healthy_fallback(versions, name)}, or `incremental rollback {name} --force` to keep it on purpose", False,
                )
            ]  # fmt: skip
    return []


def _history(registry: Registry, versions: list[VersionInfo]) -> list[Finding]:
    findings = []
    by_name = {info.name: info for info in versions}
    entries, torn = registry.history_lines()
    if torn:
        lines = ", ".join(str(number) for number in torn)
        findings.append(
            _finding(
                registry, "warning", "history-torn", layout.HISTORY,
                f"{layout.HISTORY} line {lines} is not a JSON object (a crash cut an append short)",
                f"rewrite {layout.HISTORY} without it (its text is kept in {layout.HISTORY_TORN})", True,
            )
        )  # fmt: skip
    missing = registry.missing_history_entry()
    if missing is not None:
        findings.append(
            _finding(
                registry, "warning", "history-missing-move", layout.HISTORY,
                f"the pointer was moved to {missing.get('to') or 'the base model'} ({missing.get('action')}) but "
                f"{layout.HISTORY} does not record it (a crash between the two)",
                f"append the move to {layout.HISTORY} from {layout.CURRENT_POINTER}", True,
            )
        )  # fmt: skip
    legacy = _legacy_missing_promotion(registry, by_name, entries)
    if legacy is not None:
        findings.append(
            _finding(
                registry, "warning", "history-missing-promotion", legacy["to"],
                f"the pointer names {legacy['to']}, but {layout.HISTORY} never moved it there (a crash after the "
                "pointer moved, written before the pointer recorded its moves)",
                f"append the promotion of {legacy['to']} to {layout.HISTORY}, rebuilt from its manifest", True,
            )
        )  # fmt: skip
    if missing is None and legacy is None and entries:
        try:
            record = registry.pointer_record()
        except RegistryError:
            record = None  # reported as pointer-unreadable
        pointed = record["current"] if record is not None else None
        if record is not None and entries[-1].get("to") != pointed:
            findings.append(
                _finding(
                    registry, "warning", "history-out-of-line", layout.HISTORY,
                    f"{layout.HISTORY} ends with a move to {entries[-1].get('to') or 'the base model'}, but the pointer "
                    f"names {pointed or 'the base model'}",
                    "one of them was edited by hand: check which version should be current and "
                    "`incremental rollback` to it, which records the move", False,
                )
            )  # fmt: skip
    for entry in entries:
        target = entry.get("to")
        if target is not None and target not in by_name:
            findings.append(
                _finding(
                    registry, "warning", "history-unknown-version", str(target),
                    f"{layout.HISTORY} moves the pointer to {target} ({entry.get('action')} at {entry.get('at')}), "
                    "which is not a finished version (deleted by hand?)",
                    "nothing to do unless you need it; the history stays as it was", False,
                )
            )  # fmt: skip
            continue
        info = by_name.get(target)
        promotion = info.manifest.promotion if info is not None and info.manifest is not None else None
        if entry.get("action") == "promote" and promotion is not None and promotion.decision != "promote":
            findings.append(
                _finding(
                    registry, "warning", "history-promotion-without-decision", str(target),
                    f"{layout.HISTORY} promotes {target}, but its manifest says finalize kept the pointer "
                    f"({promotion.reason})",
                    "inspect the history and the manifest; one of them was edited by hand", False,
                )
            )  # fmt: skip
    return findings


def _legacy_missing_promotion(registry: Registry, by_name: dict[str, VersionInfo], entries: list[dict]) -> dict | None:
    """The promotion a pointer written before moves were recorded shows and the history lacks, rebuilt."""
    try:
        record = registry.pointer_record()
    except RegistryError:
        return None
    if record is None or "move" in record or record["current"] is None:
        return None
    name = record["current"]
    info = by_name.get(name)
    if info is None or info.manifest is None or info.manifest.promotion is None:
        return None
    if info.manifest.promotion.decision != "promote" or any(entry.get("to") == name for entry in entries):
        return None
    finalized = info.manifest.finalized_at
    return {
        "action": "promote",
        "at": (finalized or datetime.now(timezone.utc)).isoformat(),
        "from": entries[-1].get("to") if entries else info.manifest.parent,
        "to": name,
        "reason": f"{info.manifest.promotion.reason} (history line rebuilt by incremental doctor)",
    }


# ---- the database and the bases ----------------------------------------------------------------


def _ledger(registry: Registry, versions: list[VersionInfo], db_path: Path) -> list[Finding]:
    from incremental.feedback import FeedbackStore  # deferred: DuckDB is only needed with a database

    if not db_path.is_file():
        fix = "pass the feedback database's path"
        return [_finding(registry, "info", "ledger-unreadable", str(db_path), f"{db_path} does not exist", fix, False)]
    store = FeedbackStore(db_path)
    findings = []
    for info in versions:
        if info.manifest is None:
            continue
        data = info.manifest.data
        try:
            recorded = store.trained_on(registry.model, info.name)
        except IncrementalError as exc:
            what, fix = f"the ledger cannot be read: {exc}", "retry when the database is free"
            return [_finding(registry, "info", "ledger-unreadable", str(db_path), what, fix, False)]
        if not recorded["new"] and not recorded["replay"] and (data.new_ids or data.replay_ids):
            findings.append(
                _finding(
                    registry, "warning", "ledger-missing", info.name,
                    f"the database records no training rows for {info.name}; its manifest lists "
                    f"{len(data.new_ids)} new and {len(data.replay_ids)} replayed rows, so runs on its lineage may "
                    "count them as new again",
                    f"check that {db_path} is the database {info.name} was trained from", False,
                )
            )  # fmt: skip
        elif set(recorded["new"]) != set(data.new_ids) or set(recorded["replay"]) != set(data.replay_ids):
            findings.append(
                _finding(
                    registry, "error", "ledger-mismatch", info.name,
                    f"the rows the database records for {info.name} differ from its manifest "
                    f"({len(recorded['new'])} new / {len(recorded['replay'])} replayed vs "
                    f"{len(data.new_ids)} / {len(data.replay_ids)})",
                    f"check that {db_path} belongs to this models folder; neither record is changed by the doctor", False,
                )
            )  # fmt: skip
    return findings


def _bases(registry: Registry, versions: list[VersionInfo], embedded_cache_dir: Path | None) -> list[Finding]:
    folders: dict[Path, list[str]] = {}
    for info in versions:
        if info.manifest is None:
            continue
        ref = info.manifest.base_model
        if ref.id == EMBEDDED_BASE and embedded_cache_dir is not None and ref.revision:
            folder = Path(embedded_cache_dir) / ref.revision
        elif ref.id != EMBEDDED_BASE and Path(ref.id).is_dir():
            folder = Path(ref.id)
        else:
            continue
        if folder.is_dir():
            folders.setdefault(folder, []).append(info.name)
    findings = []
    for folder, names in folders.items():
        from incremental.embedded import check_base_files  # deferred: imports torch

        try:
            check_base_files(folder)
        except IncrementalError as exc:
            findings.append(
                _finding(
                    registry, "error", "base-damaged", str(folder),
                    f"{exc} (the base of {', '.join(names)})", f"delete {folder}; it is rebuilt on next use", False,
                )
            )  # fmt: skip
    return findings


# ---- repairs: each checks again, under the lock, that its finding still holds ------------------


def _remove_dead_staging(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    folder = registry.root / finding.subject
    if not folder.is_dir() or _staging_state(folder, stale_after_s)[0] != "dead":
        return None
    shutil.rmtree(folder)
    layout.owner_file(folder).unlink(missing_ok=True)
    return f"removed {finding.subject} (left by a run that died)"


def _remove_orphan_owner(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    path = registry.root / finding.subject
    if not path.is_file() or path.with_name(path.name.removesuffix(layout.OWNER_SUFFIX)).exists():
        return None
    path.unlink()
    return f"removed {finding.subject}"


def _remove_temp_file(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    path = registry.root / finding.subject
    if not (layout.TEMP_FILE.match(path.name) and path.is_file()):
        return None
    path.unlink()
    return f"removed {finding.subject}"


def _remove_junk(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    folder = registry.root / finding.subject
    if not layout.VERSION_NAME.match(folder.name):
        return None
    removed = []
    for entry in sorted(folder.iterdir()):
        if layout.is_junk(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
            removed.append(entry.name)
    return f"removed {', '.join(removed)} from {finding.subject}" if removed else None


def _drop_torn_lines(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    entries, torn = registry.history_lines()
    if not torn:
        return None
    path = registry.root / layout.HISTORY
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = "".join(lines[number - 1] + "\n" for number in torn)
    with open(registry.root / layout.HISTORY_TORN, "a", encoding="utf-8") as handle:
        handle.write(kept)
        handle.flush()
        os.fsync(handle.fileno())
    registry.rewrite_history(entries)
    return f"took {len(torn)} torn line(s) out of {layout.HISTORY} (kept in {layout.HISTORY_TORN})"


def _append_missing_move(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    move = registry.missing_history_entry()
    if move is None:
        return None
    registry.append_history(move)
    return f"appended the pointer's last move (to {move.get('to') or 'the base model'}) to {layout.HISTORY}"


def _append_missing_promotion(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    versions = {info.name: info for info in registry.versions(check_files=False)}
    entry = _legacy_missing_promotion(registry, versions, registry.history())
    if entry is None:
        return None
    registry.append_history(entry)
    return f"appended the promotion of {entry['to']} to {layout.HISTORY}"


def _restore_pointer(registry: Registry, finding: Finding, stale_after_s: float) -> str | None:
    try:
        registry.pointer_record()
        return None  # readable again: someone else rewrote it
    except RegistryError:
        pass
    entries = registry.history()
    if not entries:
        return None
    last = entries[-1]
    target = last.get("to")
    if target is not None and registry.verify(target):
        return None
    registry.restore_pointer(last)
    return f"rewrote {layout.CURRENT_POINTER} from the last history entry (current: {target or 'the base model'})"


_REPAIRS = {
    "history-torn": _drop_torn_lines,
    "history-missing-move": _append_missing_move,
    "history-missing-promotion": _append_missing_promotion,
    "pointer-unreadable": _restore_pointer,
    "staging-dead": _remove_dead_staging,
    "staging-orphan-owner": _remove_orphan_owner,
    "temp-file": _remove_temp_file,
    "version-junk": _remove_junk,
}
# The history is whole before the pointer is rebuilt from its last line.
_REPAIR_ORDER = list(_REPAIRS)
