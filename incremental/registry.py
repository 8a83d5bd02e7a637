"""The version registry of one model: immutable version folders, the current pointer, the history.

Works from the `finetuned_models/<model>/` tree alone (see `layout.py`), so serving can resolve and
load the current version while a run holds the database. It knows nothing about training, scoring or
the gate: it is told a version's verdict in its manifest and decides only what happens to the pointer.
Reads take no lock (the pointer is replaced atomically, versions appear by rename); reservations,
finalization and rollbacks are serialized by `.registry.lock`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout

from incremental import layout
from incremental.errors import RegistryError
from incremental.manifest import Manifest, PromotionRecord

__all__ = ["FinalizeResult", "Registry", "Reservation", "RollbackResult", "VersionInfo"]

logger = logging.getLogger(__name__)

# Suffixes of serialization formats that can run code when loaded; refused anywhere in a version.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
GATE_REJECTED = "gate rejected"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class VersionInfo:
    """A finished version: its folder holds a manifest."""

    name: str
    number: int
    path: Path
    manifest: Manifest
    is_current: bool


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
    """What `finalize` did: the version's final status and whether the pointer moved to it."""

    name: str
    status: Literal["accepted", "rejected"]
    promoted: bool
    reason: str
    path: Path


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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

    # ---- reading -----------------------------------------------------------------------------

    def _read_pointer(self) -> str | None:
        """The name the pointer holds, unchecked (a broken pointer must not block listing or rollback)."""
        path = self._pointer_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RegistryError(f"{path} is not valid JSON ({exc}); roll back to a version to rewrite it") from exc
        if not isinstance(data, dict) or "current" not in data:
            raise RegistryError(f"{path} has no 'current' field; roll back to a version to rewrite it")
        name = data["current"]
        if name is not None and not isinstance(name, str):
            raise RegistryError(f"{path}: 'current' must be a version name or null, got {name!r}")
        return name

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

    def _read_version(self, folder: Path, pointer: str | None) -> VersionInfo:
        manifest_path = folder / layout.MANIFEST
        try:
            manifest = Manifest.read(manifest_path)
        except ValueError as exc:  # pydantic's ValidationError and JSON errors are ValueErrors
            raise RegistryError(f"{manifest_path} cannot be read as a manifest: {exc}") from exc
        if manifest.name != folder.name:
            raise RegistryError(
                f"{manifest_path} names {manifest.name!r} but sits in {folder.name!r}; version folders must not be renamed"
            )
        return VersionInfo(
            name=folder.name,
            number=layout.version_number(folder.name),
            path=folder,
            manifest=manifest,
            is_current=folder.name == pointer,
        )

    def _finished_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            entry
            for entry in self.root.iterdir()
            if layout.VERSION_NAME.match(entry.name) and entry.is_dir() and (entry / layout.MANIFEST).is_file()
        ]

    def versions(self) -> list[VersionInfo]:
        """Finished versions (folder with a manifest), oldest first. Staging and incomplete folders are never listed."""
        pointer = self._read_pointer()
        infos = [self._read_version(folder, pointer) for folder in self._finished_folders()]
        return sorted(infos, key=lambda info: (info.number, info.name))

    def get(self, name: str) -> VersionInfo:
        """One finished version by name; RegistryError naming a few existing versions if unknown."""
        if isinstance(name, str) and layout.VERSION_NAME.match(name):
            folder = self.root / name
            if folder.is_dir() and (folder / layout.MANIFEST).is_file():
                return self._read_version(folder, self._read_pointer())
        names = [info.name for info in self.versions()]
        known = ", ".join(names[-5:]) if names else "none yet (base mode)"
        raise RegistryError(f"{name!r} is not a finished version of {self.model!r}; latest versions: {known}")

    def lineage(self, name: str | None = None) -> list[str]:
        """`name`, its parent, grandparent, ... back to the first version. Default: from current; [] in base mode."""
        start = self.current() if name is None else name
        if start is None:
            return []
        by_name = {info.name: info for info in self.versions()}
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
            chain.append(cursor)
            cursor = info.manifest.parent
        return chain

    def history(self) -> list[dict]:
        """Pointer moves, oldest first. A line cut short by a crash mid-append is skipped with a warning."""
        try:
            text = self._history_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        entries: list[dict] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                logger.warning("%s line %d is not JSON (a crash mid-append?); skipped", self._history_path, number)
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def adapter_dir(self, name: str) -> Path:
        """The folder a loader may read `name` from, after checking it is complete, pickle-free and self-contained."""
        info = self.get(name)
        folder = info.path
        model_root = self.root.resolve()
        resolved = folder.resolve()
        if folder.is_symlink() or resolved.parent != model_root:
            raise RegistryError(f"{folder} resolves to {resolved}, outside {model_root}; refusing to load it")
        for entry in folder.iterdir():
            if _is_pickle(entry.name):
                raise RegistryError(f"{entry} is a pickle file; adapters are loaded from safetensors only")
            if entry.name not in layout.VERSION_FILES:
                raise RegistryError(f"{entry} does not belong in a version folder; expected only {sorted(layout.VERSION_FILES)}")
            # finalize never writes links, so any link was put there later and may lead anywhere.
            if entry.is_symlink():
                raise RegistryError(f"{entry} is a link (to {entry.resolve()}); refusing to load {name}")
            if not entry.is_file():
                raise RegistryError(f"{entry} is not a regular file; refusing to load {name}")
        for required in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS):
            if not (folder / required).is_file():
                raise RegistryError(f"{folder} has no {required}; the version is incomplete and cannot be loaded")
        expected = info.manifest.adapter_sha256
        if expected is not None and _sha256(folder / layout.ADAPTER_WEIGHTS) != expected:
            raise RegistryError(
                f"{folder / layout.ADAPTER_WEIGHTS} does not match the sha256 in its manifest; the file was changed "
                "after the version was finalized: roll back to another version"
            )
        return folder

    # ---- writing -----------------------------------------------------------------------------

    def _used_numbers(self) -> list[int]:
        """Every N ever handed out that is still visible: version folders (finished or not), staging, pointer, history."""
        names: list[str] = []
        for folder in (self.root, self._staging):
            if folder.is_dir():
                names.extend(entry.name for entry in folder.iterdir())
        names.append(self._read_pointer() or "")
        for entry in self.history():
            names.extend(str(entry.get(key) or "") for key in ("from", "to"))
        return [layout.version_number(name) for name in names if layout.VERSION_NAME.match(name)]

    def reserve(self, parent: str | None, now: datetime | None = None) -> Reservation:
        """Hand out the next version name (N = 1 + highest N seen) and create its staging folder."""
        if parent is not None:
            self.get(parent)
        created_at = _utc(now)
        with self._lock():
            number = max(self._used_numbers(), default=0) + 1
            name = layout.version_name(number, created_at.strftime(layout.VERSION_TIME_FORMAT))
            staging_dir = self._staging / name
            staging_dir.mkdir(parents=True)
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

    def _check_staging(self, reservation: Reservation) -> Path:
        """The staging folder holds the adapter and nothing else; returns the weights file."""
        staging = reservation.staging_dir
        if (self.root / reservation.name).exists():
            raise RegistryError(f"{reservation.name} is already finalized; versions are immutable, reserve a new one")
        if not staging.is_dir():
            raise RegistryError(f"{staging} does not exist: {reservation.name} was released or never reserved; reserve a new one")
        entries = {entry.name: entry for entry in staging.iterdir()}
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
        missing = [name for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS) if name not in entries]
        if missing:
            raise RegistryError(f"{staging} has no {', '.join(missing)}; save the adapter into the staging folder first")
        try:
            config = json.loads(entries[layout.ADAPTER_CONFIG].read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RegistryError(f"{entries[layout.ADAPTER_CONFIG]} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise RegistryError(f"{entries[layout.ADAPTER_CONFIG]} must hold a JSON object")
        weights = entries[layout.ADAPTER_WEIGHTS]
        _check_safetensors_header(weights)
        return weights

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

    def finalize(self, reservation: Reservation, manifest: Manifest) -> FinalizeResult:
        """Turn a reservation into an immutable version; promote it only if its parent is still current.

        `manifest.status` carries the gate's verdict. The registry fills in `adapter_sha256`,
        `finalized_at` and `promotion`, and turns an accepted candidate whose parent is no longer
        current into a rejected version (compare-and-swap on the pointer).
        """
        self._check_own(reservation)
        self._check_manifest(reservation, manifest)
        # Hashing and syncing happen outside the lock (a 7B adapter takes a while); another thread or
        # process finalizing or releasing the same reservation meanwhile moves the files away.
        try:
            weights = self._check_staging(reservation)
            adapter_sha256 = _sha256(weights)
            for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS):
                _fsync_file(reservation.staging_dir / name)
        except FileNotFoundError:
            self._check_staging(reservation)  # names what happened: already finalized, or released
            raise

        with self._lock():
            # Re-checked under the lock: another thread or process may have finalized it meanwhile.
            self._check_staging(reservation)
            pointer = self._read_pointer()
            status = manifest.status
            if status == "accepted" and pointer == reservation.parent:
                promoted, reason = True, f"gate accepted; promoted over {_label(reservation.parent)}"
            elif status == "accepted":
                status, promoted = "rejected", False
                reason = (
                    f"parent {_label(reservation.parent)} is no longer current (now {_label(pointer)}): "
                    "re-run to evaluate against it"
                )
            else:
                promoted, reason = False, GATE_REJECTED
            finalized_at = datetime.now(timezone.utc)
            final = manifest.model_copy(
                update={
                    "status": status,
                    "finalized_at": finalized_at,
                    "adapter_sha256": adapter_sha256,
                    "promotion": PromotionRecord(promoted=promoted, reason=reason),
                }
            )
            # The manifest goes in last: a folder without one is never listed or loaded. Staging is
            # invisible, so a manifest left there by a crash is simply overwritten by the retry.
            with open(reservation.staging_dir / layout.MANIFEST, "w", encoding="utf-8") as handle:
                handle.write(final.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(reservation.staging_dir)
            destination = self.root / reservation.name
            os.rename(reservation.staging_dir, destination)
            _fsync_dir(self.root)
            if promoted:
                self._move_pointer(reservation.name, finalized_at)
                self._append_history(
                    {"at": finalized_at.isoformat(), "action": "promote", "from": pointer, "to": reservation.name, "reason": reason}
                )
        if promoted:
            logger.info("[INCREMENTAL] Promoted %s (builds on %s)", reservation.name, _label(reservation.parent))
        else:
            logger.info("[INCREMENTAL] Kept %s as rejected: %s", reservation.name, reason)
        return FinalizeResult(name=reservation.name, status=status, promoted=promoted, reason=reason, path=destination)

    def rollback(self, target: str | None, *, force: bool = False, reason: str = "") -> RollbackResult:
        """Point `current` at `target` (None: back to base mode). A rejected target needs `force=True`.

        The next run builds on the new current version. Rolling back to the version that is already
        current writes nothing and says so.
        """
        info = self.get(target) if target is not None else None
        forced = info is not None and info.manifest.status == "rejected"
        if forced and not force:
            promotion = info.manifest.promotion
            why = promotion.reason if promotion is not None else GATE_REJECTED
            raise RegistryError(
                f"{target} was rejected ({why}); roll back to an accepted version, or pass --force "
                "(force=True) to make a rejected version current anyway"
            )
        with self._lock():
            previous = self._read_pointer()
            if previous == target:
                message = f"{_label(target)} is already current; nothing changed"
                logger.info("[INCREMENTAL] Rollback: %s", message)
                return RollbackResult(previous=previous, current=target, changed=False, forced=False, message=message)
            at = datetime.now(timezone.utc)
            self._move_pointer(target, at)
            self._append_history(
                {"at": at.isoformat(), "action": "rollback", "from": previous, "to": target, "forced": forced, "reason": reason}
            )
        message = f"rolled back from {_label(previous)} to {_label(target)}" + (" (forced: target was rejected)" if forced else "")
        logger.info("[INCREMENTAL] %s; the next training builds on %s", message.capitalize(), _label(target))
        return RollbackResult(previous=previous, current=target, changed=True, forced=forced, message=message)

    def _move_pointer(self, name: str | None, at: datetime) -> None:
        _write_atomic(self._pointer_path, json.dumps({"current": name, "updated_at": at.isoformat()}, sort_keys=True) + "\n")

    def _append_history(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        path = self._history_path
        # A line cut short by an earlier crash must not swallow this one.
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


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
