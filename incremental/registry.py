"""The version registry of one model: immutable version folders, the current pointer, the history.

Works from the `finetuned_models/<model>/` tree alone (see `layout.py`), so serving can resolve and
load the current version while a run holds the database. It knows nothing about training, scoring or
the gate: it is told a version's verdict in its manifest and decides only what happens to the pointer.
Every file of a version is hashed into its manifest at finalize and checked before the version is
loaded, trained from or rolled back to; listing reports a damaged version instead of failing.
Reads take no lock (the pointer is replaced atomically, versions appear by rename); reservations,
finalization and rollbacks are serialized by `.registry.lock`. What it writes is readable by the
group (`share_with_group`), so a serving process of another user can load a version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout
from pydantic import ValidationError

from incremental import layout
from incremental.errors import RegistryError
from incremental.files import share_with_group
from incremental.manifest import BaseModelRef, Manifest, PromotionRecord
from incremental.prompting import LATEST_LAYOUT

__all__ = ["FinalizeResult", "PromotionState", "Registry", "Reservation", "RollbackResult", "VersionInfo"]

logger = logging.getLogger(__name__)

# Suffixes of serialization formats that can run code when loaded; refused anywhere in a version.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
GATE_REJECTED = "gate rejected"
REQUIRED_FILES = (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS)
CHANGED = "changed after the version was finalized (its sha256 does not match the manifest)"
FIX_VERSION = "roll back to a healthy version (`incremental rollback <version>`); `incremental doctor` lists every problem"

# promoted: the pointer moved to it when it was finalized. interrupted: finalize decided to promote
# it, but the run stopped before the pointer moved (it never was current by promotion). kept:
# finalize left the pointer where it was (gate rejected, or its parent was no longer current).
PromotionState = Literal["promoted", "interrupted", "kept"]


@dataclass(frozen=True)
class VersionInfo:
    """A finished version: its folder holds a manifest (which may be unreadable: see `problems`).

    `problems` says why the version must not be used (loading, training from it and rolling back to
    it are refused); `junk` lists files a desktop dropped in (ignored). Listings that skip the file
    check (`versions(check_files=False)`) only report problems with the manifest itself.
    """

    name: str
    number: int
    path: Path
    manifest: Manifest | None  # None when manifest.json cannot be read; `problems` says why
    is_current: bool
    problems: tuple[str, ...] = ()
    junk: tuple[str, ...] = ()
    promotion_state: PromotionState | None = None  # None without a readable promotion record

    @property
    def problem(self) -> str | None:
        """All problems in one line, or None for a healthy version."""
        return "; ".join(self.problems) or None


@dataclass(frozen=True)
class Reservation:
    """A version name handed to a run; its files go into `staging_dir` until `finalize`."""

    name: str
    number: int
    parent: str | None
    staging_dir: Path
    created_at: datetime


@dataclass(frozen=True)
class FinalizeResult:
    """What `finalize` did: the version's final status and whether the pointer moved to it.

    `interrupted` names earlier versions that were to be promoted but whose run stopped before the
    pointer moved (they are finished, accepted and not current; `incremental doctor` explains).
    """

    name: str
    status: Literal["accepted", "rejected"]
    promoted: bool
    reason: str
    path: Path
    interrupted: tuple[str, ...] = ()
    current: str | None = None  # the current version after finalize (the candidate when promoted)


@dataclass(frozen=True)
class ParentVersion:
    """The accepted version a run continues from; all None/empty in Base Mode."""

    name: str | None
    adapter_dir: Path | None
    lineage: tuple[str, ...]
    base: BaseModelRef | None
    accepted_at: datetime | None = None  # feedback that arrived by then is trusted for judging its children
    # The prompt layout the lineage was trained with; its children keep it. Base Mode: the one a new lineage starts with.
    prompt_layout: int = LATEST_LAYOUT


@dataclass(frozen=True)
class RollbackResult:
    """What `rollback` did. `changed` is False when the target was already current (nothing written)."""

    previous: str | None
    current: str | None
    changed: bool
    forced: bool
    message: str


def _label(name: str | None) -> str:
    return name if name is not None else "the base model"


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    # A naive datetime is taken to be UTC already: version stamps are always UTC.
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new, never a mix."""
    tmp = layout.temp_file(path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    share_with_group(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_safetensors_header(path: Path) -> None:
    """Refuse a weights file that is not safetensors (e.g. a pickle renamed), without loading it."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) == 8:
            (header_len,) = struct.unpack("<Q", head)
            if 2 <= header_len <= size - 8:
                try:
                    header = json.loads(handle.read(header_len))
                except ValueError:
                    header = None
                if isinstance(header, dict):
                    return
    raise RegistryError(
        f"{path} is not a safetensors file; save the adapter with safetensors "
        "(peft's save_pretrained(..., safe_serialization=True))"
    )


def _is_pickle(name: str) -> bool:
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


def _first_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):  # its first line only says "1 validation error for Manifest"
        first, more = error.errors()[0], error.error_count() - 1
        where = ".".join(str(part) for part in first["loc"])
        return f"{first['msg']}{f' at {where}' if where else ''}{f', and {more} more' if more else ''}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Registry:
    """The versions of `model` under `models_root/model/`."""

    def __init__(self, models_root: Path, model: str, *, lock_timeout_s: float = 60.0) -> None:
        if not isinstance(model, str) or layout.MODEL_NAME.match(model) is None:
            raise ValueError(
                f"model: {model!r} is not a valid model name; use 1-64 lowercase letters, digits, '.', '_' "
                "or '-', starting with a letter or digit (e.g. 'codellama-7b')"
            )
        if lock_timeout_s <= 0:
            raise ValueError(f"lock_timeout_s: must be > 0 seconds, got {lock_timeout_s!r}")
        self.model = model
        self.root = Path(models_root) / model
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ---- paths and locking -------------------------------------------------------------------

    @property
    def _staging(self) -> Path:
        return self.root / layout.STAGING_DIR

    @property
    def _pointer_path(self) -> Path:
        return self.root / layout.CURRENT_POINTER

    @property
    def _history_path(self) -> Path:
        return self.root / layout.HISTORY

    def _lock(self) -> _RegistryLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return _RegistryLock(self.root / layout.LOCK_FILE, self.lock_timeout_s)

    # ---- reading the pointer and the history -------------------------------------------------

    def pointer_record(self) -> dict | None:
        """The pointer file as written: `current`, `updated_at` and the `move` (history entry) that set it.

        None when there is no pointer (base mode). Pointers written before moves were recorded have
        no `move`. RegistryError when the file is not a pointer (torn or edited).
        """
        path = self._pointer_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            raise RegistryError(f"{path} is not text ({exc}); roll back to a version to rewrite it") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RegistryError(f"{path} is not valid JSON ({exc}); roll back to a version to rewrite it") from exc
        if not isinstance(data, dict) or "current" not in data:
            raise RegistryError(f"{path} has no 'current' field; roll back to a version to rewrite it")
        name = data["current"]
        if name is not None and not isinstance(name, str):
            raise RegistryError(f"{path}: 'current' must be a version name or null, got {name!r}")
        if not isinstance(data.get("move"), (dict, type(None))):
            raise RegistryError(f"{path}: 'move' must be a history entry, got {data['move']!r}")
        return data

    def _read_pointer(self) -> str | None:
        """The name the pointer holds, unchecked (a broken pointer must not block listing or rollback)."""
        record = self.pointer_record()
        return None if record is None else record["current"]

    def _read_pointer_or_none(self) -> str | None:
        """Like `_read_pointer`, but an unreadable pointer reads as None (for listing; `current()` reports it)."""
        try:
            return self._read_pointer()
        except RegistryError as exc:
            logger.warning("[INCREMENTAL] %s", exc)
            return None

    def current(self) -> str | None:
        """The current version's name; None in base mode (nothing promoted yet, or rolled back to base)."""
        name = self._read_pointer()
        if name is None:
            return None
        if layout.VERSION_NAME.match(name) is None:
            raise RegistryError(
                f"{self._pointer_path} names {name!r}, which is not a version name; "
                "roll back to an existing version to repair the pointer"
            )
        folder = self.root / name
        if not (folder.is_dir() and (folder / layout.MANIFEST).is_file()):
            raise RegistryError(
                f"the current pointer of {self.model!r} names {name}, but {folder} is missing or incomplete "
                "(no manifest); roll back to an existing version to repair the pointer"
            )
        return name

    def history_lines(self) -> tuple[list[dict], list[int]]:
        """History entries, oldest first, and the numbers of lines that are not JSON objects (torn by a crash)."""
        try:
            text = self._history_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        entries: list[dict] = []
        torn: list[int] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                torn.append(number)
        return entries, torn

    def history(self) -> list[dict]:
        """Pointer moves, oldest first. A line cut short by a crash mid-append is skipped with a warning."""
        entries, torn = self.history_lines()
        for number in torn:
            logger.warning("%s line %d is not a JSON object (a crash mid-append?); skipped", self._history_path, number)
        return entries

    def _pointer_promotion(self, record: dict | None, history: list[dict]) -> str | None:
        """The version the pointer was moved to by a promotion that the history may not show yet."""
        if record is None:
            return None
        move = record.get("move")
        if move is not None:
            return move.get("to") if move.get("action") == "promote" else None
        # A pointer written before moves were recorded: a name the history never moved to can only
        # have been set by a promotion whose history line was lost.
        name = record["current"]
        return name if name is not None and all(entry.get("to") != name for entry in history) else None

    def _promotion_states(self, manifests: dict[str, Manifest | None]) -> dict[str, PromotionState | None]:
        history, _ = self.history_lines()
        try:
            record = self.pointer_record()
        except RegistryError:
            record = None
        promoted = {entry.get("to") for entry in history if entry.get("action") == "promote"}
        promoted.add(self._pointer_promotion(record, history))
        states: dict[str, PromotionState | None] = {}
        for name, manifest in manifests.items():
            promotion = manifest.promotion if manifest is not None else None
            if promotion is None:
                states[name] = None
            elif promotion.decision == "keep":
                states[name] = "kept"
            else:
                states[name] = "promoted" if name in promoted else "interrupted"
        return states

    # ---- reading versions --------------------------------------------------------------------

    def _finished_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            entry
            for entry in self.root.iterdir()
            if layout.VERSION_NAME.match(entry.name) and entry.is_dir() and (entry / layout.MANIFEST).is_file()
        ]

    def _read_manifest(self, folder: Path) -> tuple[Manifest | None, list[str]]:
        path = folder / layout.MANIFEST
        try:
            manifest = Manifest.read(path)
        except (ValueError, OSError) as exc:  # pydantic's ValidationError, JSON and decoding errors are ValueErrors
            return None, [f"{layout.MANIFEST} cannot be read as a manifest ({_first_line(exc)})"]
        problems = []
        if manifest.name != folder.name:
            problems.append(f"{layout.MANIFEST} names {manifest.name!r}; version folders must not be renamed")
        if manifest.model != self.model:
            problems.append(f"{layout.MANIFEST} belongs to model {manifest.model!r}, not {self.model!r}")
        return manifest, problems

    def _check_files(self, folder: Path, manifest: Manifest | None) -> tuple[list[str], list[str]]:
        """(problems, junk) of the files in `folder` against the hashes its manifest recorded."""
        model_root = self.root.resolve()
        resolved = folder.resolve()
        if folder.is_symlink() or resolved.parent != model_root:
            return [f"the folder resolves to {resolved}, outside {model_root}"], []
        problems: list[str] = []
        junk: list[str] = []
        present: dict[str, Path] = {}
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if name == layout.MANIFEST:
                continue
            # finalize never writes links, so any link was put there later and may lead anywhere.
            if entry.is_symlink():
                problems.append(f"{name} is a link (to {os.readlink(entry)})")
            elif layout.is_junk(name) and entry.is_file():
                junk.append(name)
            elif _is_pickle(name):
                problems.append(f"{name} is a pickle file (adapters are loaded from safetensors only)")
            elif not entry.is_file():
                problems.append(f"{name} is not a regular file")
            elif name not in layout.VERSION_FILES:
                problems.append(f"{name} does not belong in a version folder (it may hold only {sorted(layout.VERSION_FILES)})")
            else:
                present[name] = entry
        recorded = manifest.files if manifest is not None else {}
        hashed = layout.VERSION_FILES - {layout.MANIFEST}
        for name in sorted(set(recorded) - hashed):
            problems.append(f"the manifest records a hash for {name!r}, which is not a version file")
        expected = sorted((set(recorded) & hashed) | set(REQUIRED_FILES))
        problems += [f"{name} is missing" for name in expected if name not in present]
        if manifest is None:
            return problems, junk
        if recorded:
            for name in expected:
                if name in present and _sha256(present[name]) != recorded.get(name):
                    problems.append(f"{name} {CHANGED}")
            problems += [
                f"{name} was added after the version was finalized (the manifest records no hash for it)"
                for name in sorted(set(present) - set(recorded))
            ]
            return problems, junk
        # Manifests of schema 2 and older hashed the weights only; the config can only be parsed.
        weights, config = present.get(layout.ADAPTER_WEIGHTS), present.get(layout.ADAPTER_CONFIG)
        if weights is not None:
            try:
                _check_safetensors_header(weights)
            except RegistryError:
                problems.append(f"{layout.ADAPTER_WEIGHTS} is not a safetensors file")
            else:
                if manifest.adapter_sha256 is not None and _sha256(weights) != manifest.adapter_sha256:
                    problems.append(f"{layout.ADAPTER_WEIGHTS} {CHANGED}")
        if config is not None:
            try:
                parsed = json.loads(config.read_text(encoding="utf-8"))
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                problems.append(f"{layout.ADAPTER_CONFIG} is not a JSON object")
        return problems, junk

    def _listing(self, *, check_files: bool) -> list[VersionInfo]:
        pointer = self._read_pointer_or_none()
        read = {folder.name: (folder, *self._read_manifest(folder)) for folder in self._finished_folders()}
        states = self._promotion_states({name: manifest for name, (_, manifest, _) in read.items()})
        infos = []
        for name, (folder, manifest, problems) in read.items():
            junk: list[str] = []
            if check_files:
                file_problems, junk = self._check_files(folder, manifest)
                problems = problems + file_problems
            infos.append(
                VersionInfo(
                    name=name,
                    number=layout.version_number(name),
                    path=folder,
                    manifest=manifest,
                    is_current=name == pointer,
                    problems=tuple(problems),
                    junk=tuple(junk),
                    promotion_state=states[name],
                )
            )
        return sorted(infos, key=lambda info: (info.number, info.name))

    def versions(self, *, check_files: bool = True) -> list[VersionInfo]:
        """Finished versions (folder with a manifest), oldest first, each with its problems, if any.

        A damaged version (unreadable manifest, changed or missing files) is listed with its problems,
        never an error. `check_files=False` skips hashing the files (reading every adapter); only
        problems with the manifests are reported then. Staging and incomplete folders are never listed.
        """
        return self._listing(check_files=check_files)

    def _find(self, name: str, *, check_files: bool) -> VersionInfo:
        if isinstance(name, str) and layout.VERSION_NAME.match(name):
            folder = self.root / name
            if folder.is_dir() and (folder / layout.MANIFEST).is_file():
                manifest, problems = self._read_manifest(folder)
                junk: list[str] = []
                if check_files:
                    file_problems, junk = self._check_files(folder, manifest)
                    problems += file_problems
                return VersionInfo(
                    name=name,
                    number=layout.version_number(name),
                    path=folder,
                    manifest=manifest,
                    is_current=name == self._read_pointer_or_none(),
                    problems=tuple(problems),
                    junk=tuple(junk),
                    promotion_state=self._promotion_states({name: manifest})[name],
                )
        names = [info.name for info in self._listing(check_files=False)]
        known = ", ".join(names[-5:]) if names else "none yet (base mode)"
        raise RegistryError(f"{name!r} is not a finished version of {self.model!r}; latest versions: {known}")

    def get(self, name: str) -> VersionInfo:
        """One finished version by name, with a readable manifest (its files are not checked: see `verify`).

        RegistryError naming a few existing versions if unknown, or naming the problem if its
        manifest cannot be read.
        """
        info = self._find(name, check_files=False)
        if info.problems:
            raise RegistryError(f"{name} cannot be used: {info.problem}; {FIX_VERSION}")
        return info

    def verify(self, name: str) -> list[str]:
        """Why `name` must not be used ([] when healthy): unreadable manifest, missing, changed, added,
        linked or pickled files. Reads and hashes every file of the version. Desktop junk files
        (`.DS_Store`, ...) are no problem. RegistryError if `name` is not a finished version."""
        return list(self._find(name, check_files=True).problems)

    def lineage(self, name: str | None = None) -> list[str]:
        """`name`, its parent, grandparent, ... back to the first version. Default: from current; [] in base mode."""
        start = self.current() if name is None else name
        if start is None:
            return []
        by_name = {info.name: info for info in self._listing(check_files=False)}
        chain: list[str] = []
        cursor: str | None = start
        while cursor is not None:
            if cursor in chain:
                raise RegistryError(f"the lineage of {start} loops at {cursor} ({' <- '.join(chain)}); a manifest is corrupt")
            info = by_name.get(cursor)
            if info is None:
                if not chain:
                    return [self.get(cursor).name]  # raises the unknown-version error
                raise RegistryError(
                    f"the lineage of {start} is broken: {chain[-1]} names parent {cursor}, which is not a finished version"
                )
            if info.manifest is None:
                raise RegistryError(f"the lineage of {start} is broken at {cursor}: {info.problem}; {FIX_VERSION}")
            chain.append(cursor)
            cursor = info.manifest.parent
        return chain

    def parent(self, new_lineage_layout: int = LATEST_LAYOUT) -> ParentVersion:
        """What the next training builds on: the current accepted version with its lineage, base,
        acceptance time and prompt layout, read from the folder tree (Base Mode: all None, and the
        layout a new lineage starts with, `new_lineage_layout`)."""
        name = self.current()
        if name is None:
            return ParentVersion(name=None, adapter_dir=None, lineage=(), base=None, prompt_layout=new_lineage_layout)
        version = self.get(name)
        return ParentVersion(
            name=name,
            adapter_dir=self.adapter_dir(name),
            lineage=tuple(self.lineage(name)),
            base=version.manifest.base_model,
            accepted_at=version.manifest.finalized_at,
            prompt_layout=version.manifest.prompt_layout,
        )

    def adapter_dir(self, name: str) -> Path:
        """The folder a loader may read `name` from, after checking every file against its manifest.

        Refused (RegistryError naming the version and the problem) when anything is missing,
        changed, added, linked or pickled. Desktop junk files are ignored with a warning.
        """
        info = self._find(name, check_files=True)
        if info.problems:
            raise RegistryError(f"{name} ({info.path}) cannot be loaded: {info.problem}; {FIX_VERSION}")
        if info.junk:
            logger.warning("[INCREMENTAL] %s holds %s (left by a desktop); ignored", name, ", ".join(info.junk))
        return info.path

    # ---- writing -----------------------------------------------------------------------------

    def next_number(self) -> int:
        """The N the next reservation would get (informational: `reserve` decides under the lock)."""
        return max(self._used_numbers(), default=0) + 1

    def rollback_targets(self) -> list[str]:
        """Accepted versions, newest first, other than the current one, that `rollback` would accept
        (manifests only: the files are checked when a rollback actually moves the pointer)."""
        current = self.current()
        return [
            info.name
            for info in sorted(self.versions(check_files=False), key=lambda info: -info.number)
            if info.name != current and not info.problems and info.manifest is not None and info.manifest.status == "accepted"
        ]

    def _used_numbers(self) -> list[int]:
        """Every N ever handed out that is still visible: version folders (finished or not), staging, pointer, history."""
        names: list[str] = []
        for folder in (self.root, self._staging):
            if folder.is_dir():
                names.extend(entry.name for entry in folder.iterdir())
        names.append(self._read_pointer_or_none() or "")
        for entry in self.history():
            names.extend(str(entry.get(key) or "") for key in ("from", "to"))
        return [layout.version_number(name) for name in names if layout.VERSION_NAME.match(name)]

    def reserve(self, parent: str | None, now: datetime | None = None) -> Reservation:
        """Hand out the next version name (N = 1 + highest N seen) and create its staging folder.

        An owner file beside the folder names this process, so `incremental doctor` can tell a
        reservation in use from one a dead run left behind.
        """
        if parent is not None:
            self.get(parent)
        created_at = _utc(now)
        with self._lock():
            number = max(self._used_numbers(), default=0) + 1
            name = layout.version_name(number, created_at.strftime(layout.VERSION_TIME_FORMAT))
            staging_dir = self._staging / name
            staging_dir.mkdir(parents=True)
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "reserved_at": time.time(), "parent": parent}
            layout.owner_file(staging_dir).write_text(json.dumps(owner, sort_keys=True) + "\n", encoding="utf-8")
        logger.info("[INCREMENTAL] Reserved %s (builds on %s)", name, _label(parent))
        return Reservation(name=name, number=number, parent=parent, staging_dir=staging_dir, created_at=created_at)

    def _check_own(self, reservation: Reservation) -> None:
        if layout.VERSION_NAME.match(reservation.name) is None or reservation.staging_dir != self._staging / reservation.name:
            raise RegistryError(
                f"reservation {reservation.name!r} (staging {reservation.staging_dir}) was not made by {self!r}; "
                "reserve through the registry of the same model"
            )

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation that ends without a version (skipped or failed run). Its number may be reused."""
        self._check_own(reservation)
        with self._lock():
            shutil.rmtree(reservation.staging_dir, ignore_errors=True)
            layout.owner_file(reservation.staging_dir).unlink(missing_ok=True)

    def abandon(self, reservation: Reservation) -> bool:
        """After a failed run: release its reservation unless its version already appeared.

        Returns True when the version never appeared (its staging folder is gone now, so the
        caller also undoes what it recorded elsewhere), False when it did: a finished version is
        immutable and stays, whatever failed after it appeared.
        """
        self._check_own(reservation)
        if (self.root / reservation.name).exists():
            return False
        self.release(reservation)
        logger.info("[INCREMENTAL] Released %s: its run failed before the version appeared", reservation.name)
        return True

    def _check_staging(self, reservation: Reservation) -> dict[str, Path]:
        """The staging folder holds the adapter (and maybe scores) and nothing else; returns those files.

        Desktop junk files (`.DS_Store`, ...) are removed: the folder is the registry's own until
        finalize, and they must not become part of an immutable version.
        """
        staging = reservation.staging_dir
        if (self.root / reservation.name).exists():
            raise RegistryError(f"{reservation.name} is already finalized; versions are immutable, reserve a new one")
        if not staging.is_dir():
            raise RegistryError(f"{staging} does not exist: {reservation.name} was released or never reserved; reserve a new one")
        entries = {}
        for entry in staging.iterdir():
            if layout.is_junk(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
            elif entry.name != layout.MANIFEST:  # one left by a crashed finalize is rewritten
                entries[entry.name] = entry
        pickles = sorted(name for name in entries if _is_pickle(name))
        if pickles:
            raise RegistryError(
                f"{staging} holds pickle files {pickles}; save the adapter with safetensors "
                "(peft's save_pretrained(..., safe_serialization=True)) and nothing else"
            )
        unexpected = sorted(set(entries) - layout.VERSION_FILES)
        if unexpected:
            raise RegistryError(f"{staging} holds {unexpected}; a version folder may only hold {sorted(layout.VERSION_FILES)}")
        for entry in entries.values():
            if entry.is_symlink() or not entry.is_file():
                raise RegistryError(f"{entry} is a link or not a regular file; write the adapter files themselves")
        missing = [name for name in REQUIRED_FILES if name not in entries]
        if missing:
            raise RegistryError(f"{staging} has no {', '.join(missing)}; save the adapter into the staging folder first")
        try:
            config = json.loads(entries[layout.ADAPTER_CONFIG].read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RegistryError(f"{entries[layout.ADAPTER_CONFIG]} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise RegistryError(f"{entries[layout.ADAPTER_CONFIG]} must hold a JSON object")
        _check_safetensors_header(entries[layout.ADAPTER_WEIGHTS])
        return entries

    def _check_manifest(self, reservation: Reservation, manifest: Manifest) -> None:
        mismatches = [
            f"{field}={actual!r} (expected {expected!r})"
            for field, actual, expected in (
                ("name", manifest.name, reservation.name),
                ("model", manifest.model, self.model),
                ("parent", manifest.parent, reservation.parent),
            )
            if actual != expected
        ]
        if mismatches:
            raise RegistryError(f"the manifest does not match reservation {reservation.name}: {', '.join(mismatches)}")
        if manifest.status == "accepted" and manifest.gate.verdict == "reject":
            raise RegistryError(
                f"manifest status is 'accepted' but the gate's verdict is {manifest.gate.verdict!r}; "
                "set status from the gate's decision"
            )

    def interrupted(self) -> list[str]:
        """Finished versions that were to be promoted but whose run stopped before the pointer moved."""
        return [info.name for info in self._listing(check_files=False) if info.promotion_state == "interrupted"]

    def finalize(self, reservation: Reservation, manifest: Manifest) -> FinalizeResult:
        """Turn a reservation into an immutable version; promote it only if its parent is still current.

        `manifest.status` carries the gate's verdict. The registry fills in `files` (sha256 of every
        file), `adapter_sha256`, `finalized_at` and `promotion` (its decision), and turns an accepted
        candidate whose parent is no longer current into a rejected version (compare-and-swap on the
        pointer). Order: manifest, rename, pointer, history; a crash after the rename leaves a
        finished version whose promotion reads as interrupted, never one that claims it.
        """
        self._check_own(reservation)
        self._check_manifest(reservation, manifest)
        # Hashing and syncing happen outside the lock (a 7B adapter takes a while); another thread or
        # process finalizing or releasing the same reservation meanwhile moves the files away.
        try:
            entries = self._check_staging(reservation)
            files = {name: _sha256(path) for name, path in sorted(entries.items())}
            for path in entries.values():
                share_with_group(path)
                _fsync_file(path)
        except FileNotFoundError:
            self._check_staging(reservation)  # names what happened: already finalized, or released
            raise

        with self._lock():
            # Re-checked under the lock: another thread or process may have finalized it meanwhile.
            if sorted(self._check_staging(reservation)) != sorted(files):
                raise RegistryError(
                    f"{reservation.staging_dir} changed while it was being finalized; write every file first, then finalize"
                )
            try:
                pointer, unreadable = self._read_pointer(), None
            except RegistryError as exc:  # compare-and-swap fails closed: the candidate is kept, not lost
                pointer, unreadable = None, exc
            self._heal_history()
            interrupted = tuple(self.interrupted())
            status = manifest.status
            if status == "accepted" and unreadable is None and pointer == reservation.parent:
                decision, reason = "promote", f"gate accepted; promoted over {_label(reservation.parent)}"
                decided = f"gate accepted and {_label(reservation.parent)} still current: promote over it"
            elif status == "accepted" and unreadable is not None:
                status, decision = "rejected", "keep"
                reason = decided = (
                    f"the current pointer cannot be read ({unreadable}); not promoted: repair the pointer "
                    "(`incremental doctor --repair`) and re-run"
                )
            elif status == "accepted":
                status, decision = "rejected", "keep"
                reason = decided = (
                    f"parent {_label(reservation.parent)} is no longer current (now {_label(pointer)}): "
                    "re-run to evaluate against it"
                )
            else:
                decision, reason = "keep", GATE_REJECTED
                decided = reason
            finalized_at = datetime.now(timezone.utc)
            final = manifest.model_copy(
                update={
                    "status": status,
                    "finalized_at": finalized_at,
                    "adapter_sha256": files[layout.ADAPTER_WEIGHTS],
                    "files": files,
                    "promotion": PromotionRecord(decision=decision, reason=decided),
                }
            )
            # The manifest goes in last: a folder without one is never listed or loaded. Staging is
            # invisible, so a manifest left there by a crash is simply overwritten by the retry.
            with open(reservation.staging_dir / layout.MANIFEST, "w", encoding="utf-8") as handle:
                handle.write(final.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            share_with_group(reservation.staging_dir / layout.MANIFEST)
            share_with_group(reservation.staging_dir)
            _fsync_dir(reservation.staging_dir)
            destination = self.root / reservation.name
            os.rename(reservation.staging_dir, destination)
            _fsync_dir(self.root)
            layout.owner_file(reservation.staging_dir).unlink(missing_ok=True)
            if decision == "promote":
                at = finalized_at.isoformat()
                self._move({"at": at, "action": "promote", "from": pointer, "to": reservation.name, "reason": reason})
        for name in interrupted:
            logger.warning(
                "[INCREMENTAL] %s was finalized to be promoted, but its run stopped before the pointer moved: "
                "it was never current (`incremental doctor` explains; `incremental rollback %s` makes it current)",
                name, name,
            )  # fmt: skip
        promoted = decision == "promote"
        if promoted:
            logger.info("[INCREMENTAL] Promoted %s (builds on %s)", reservation.name, _label(reservation.parent))
        else:
            logger.info("[INCREMENTAL] Kept %s as rejected: %s", reservation.name, reason)
        return FinalizeResult(
            name=reservation.name, status=status, promoted=promoted, reason=reason, path=destination,
            interrupted=interrupted, current=reservation.name if promoted else pointer,
        )  # fmt: skip

    def rollback(self, target: str | None, *, force: bool = False, reason: str = "") -> RollbackResult:
        """Point `current` at `target` (None: back to base mode). A rejected target needs `force=True`.

        The target's files are checked first: a damaged version is refused, forced or not. The next
        run builds on the new current version. Rolling back to the version that is already current
        writes nothing and says so. An unreadable pointer is replaced.
        """
        info = self.get(target) if target is not None else None
        if info is not None:
            problems = self.verify(target)
            if problems:
                raise RegistryError(f"{target} cannot be rolled back to: {'; '.join(problems)}; pick another version")
        forced = info is not None and info.manifest.status == "rejected"
        if forced and not force:
            promotion = info.manifest.promotion
            why = promotion.reason if promotion is not None else GATE_REJECTED
            raise RegistryError(
                f"{target} was rejected ({why}); roll back to an accepted version, or pass --force "
                "(force=True) to make a rejected version current anyway"
            )
        with self._lock():
            try:
                previous, unreadable = self._read_pointer(), False
            except RegistryError as exc:
                logger.warning("[INCREMENTAL] %s; rewriting it", exc)
                previous, unreadable = None, True
            self._heal_history()
            if previous == target and not unreadable:
                message = f"{_label(target)} is already current; nothing changed"
                logger.info("[INCREMENTAL] Rollback: %s", message)
                return RollbackResult(previous=previous, current=target, changed=False, forced=False, message=message)
            at = datetime.now(timezone.utc).isoformat()
            self._move({"at": at, "action": "rollback", "from": previous, "to": target, "forced": forced, "reason": reason})
        source = "an unreadable pointer" if unreadable else _label(previous)
        message = f"rolled back from {source} to {_label(target)}" + (" (forced: target was rejected)" if forced else "")
        logger.info("[INCREMENTAL] %s; the next training builds on %s", message.capitalize(), _label(target))
        return RollbackResult(previous=previous, current=target, changed=True, forced=forced, message=message)

    def _move(self, entry: dict) -> None:
        """Move the pointer, then log the move. The pointer carries the move, so a crash between the two
        leaves a history line that the next move (or `incremental doctor --repair`) appends from it."""
        self._move_pointer(entry)
        self._append_history(entry)

    def _move_pointer(self, entry: dict) -> None:
        pointer = {"current": entry.get("to"), "updated_at": entry.get("at"), "move": entry}
        _write_atomic(self._pointer_path, json.dumps(pointer, sort_keys=True) + "\n")

    def missing_history_entry(self) -> dict | None:
        """The move recorded in the pointer when the history does not end with it (a crash between the two)."""
        try:
            record = self.pointer_record()
        except RegistryError:
            return None
        move = record.get("move") if record is not None else None
        if move is None:
            return None
        entries = self.history()
        return None if entries and entries[-1] == move else move

    def _heal_history(self) -> None:
        """Append the pointer's last move if the history lost it. Call under the lock."""
        move = self.missing_history_entry()
        if move is not None:
            logger.warning(
                "[INCREMENTAL] %s lacked the last pointer move (to %s); appended it", self._history_path, _label(move.get("to"))
            )
            self._append_history(move)

    def _append_history(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        path = self._history_path
        # A line cut short by an earlier crash must not swallow this one.
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        created = not path.exists()
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            share_with_group(path)


    # ---- maintenance, for `incremental.doctor`: hold `lock()` around each call -------------------

    def lock(self) -> _RegistryLock:
        """The lock that serializes reservations, finalization and pointer moves."""
        return self._lock()

    def append_history(self, entry: dict) -> None:
        """Append a move the history lost (the pointer records it, or a manifest and the pointer show it)."""
        self._append_history(entry)

    def rewrite_history(self, entries: list[dict]) -> None:
        """Replace the history with `entries` in one atomic step (to drop lines a crash cut short)."""
        _write_atomic(self._history_path, "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries))

    def restore_pointer(self, move: dict) -> None:
        """Rewrite an unreadable pointer from `move`, the last move the history holds."""
        self._move_pointer(move)


class _RegistryLock:
    """`.registry.lock`, with a timeout that ends in a message saying what to do."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._path = path
        self._timeout_s = timeout_s
        # A fresh lock object per operation: one open file per holder, so threads exclude each other too.
        self._lock = FileLock(path, timeout=timeout_s, thread_local=False)

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise RegistryError(
                f"{self._path} was held by another run or rollback for more than {self._timeout_s:g}s; "
                "wait for it to finish and retry (the lock is released when its process exits)"
            ) from exc

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()
