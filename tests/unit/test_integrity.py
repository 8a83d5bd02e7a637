"""Damaged trees on real folders: every corruption is refused where a version is used, listed where
versions are listed, and found by the doctor; crashes between finalize's steps never leave a manifest
that claims a promotion; the doctor repairs only what is safe and never deletes a finished version."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import feedback_row, ids_in
from incremental import layout
from incremental.doctor import Finding, diagnose, repair
from incremental.errors import RegistryError
from incremental.manifest import Manifest
from incremental.registry import Registry
from test_registry import MODEL, make_manifest, make_version, write_adapter

DAY = 24 * 3600


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "finetuned_models", MODEL)


def make_scored_version(registry: Registry, parent: str | None, status: str = "accepted"):
    """A version with all three files finalize hashes: config, weights and scores."""
    reservation = registry.reserve(parent)
    write_adapter(reservation.staging_dir)
    (reservation.staging_dir / layout.SCORES).write_bytes(b"PAR1 per-example scores PAR1")
    return registry.finalize(reservation, make_manifest(reservation, status))


def kinds(findings: list[Finding]) -> dict[str, list[Finding]]:
    found: dict[str, list[Finding]] = {}
    for finding in findings:
        found.setdefault(finding.kind, []).append(finding)
    return found


def doctor(registry: Registry, **kwargs) -> dict[str, list[Finding]]:
    return kinds(diagnose(registry.root.parent, registry.model, **kwargs))


# ---- corruptions of one version folder ---------------------------------------------------------


def change_config_value(folder: Path) -> None:
    config = json.loads((folder / layout.ADAPTER_CONFIG).read_text())
    config["r"] = 9  # one value, as in lora_alpha 32 -> 72: loads silently, generates garbage
    (folder / layout.ADAPTER_CONFIG).write_text(json.dumps(config))


def truncate_weights(folder: Path) -> None:
    path = folder / layout.ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:-7])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01
    path.write_bytes(bytes(data))


def link_config(folder: Path) -> None:
    config = folder / layout.ADAPTER_CONFIG
    outside = folder.parent.parent / "config-elsewhere.json"
    outside.write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(outside)


def garble_manifest(folder: Path) -> None:
    path = folder / layout.MANIFEST
    path.write_text(path.read_text()[:40])


# (id, injector, phrase the problem must contain)
CORRUPTIONS: list[tuple[str, Callable[[Path], None], str]] = [
    ("config value changed", change_config_value, "adapter_config.json changed after the version was finalized"),
    ("weights truncated", truncate_weights, "adapter_model.safetensors changed"),
    ("weights bit flipped", lambda f: flip_bit(f / layout.ADAPTER_WEIGHTS), "adapter_model.safetensors changed"),
    ("weights deleted", lambda f: (f / layout.ADAPTER_WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
    ("scores bit flipped", lambda f: flip_bit(f / layout.SCORES), "scores.parquet changed"),
    ("scores deleted", lambda f: (f / layout.SCORES).unlink(), "scores.parquet is missing"),
    ("unknown file dropped in", lambda f: (f / "notes.txt").write_text("hi"), "notes.txt does not belong"),
    ("pickle dropped in", lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04"), "adapter_model.bin is a pickle file"),
    ("config replaced by a link", link_config, "adapter_config.json is a link"),
    ("manifest cut short", garble_manifest, "manifest.json cannot be read as a manifest"),
    ("manifest not JSON", lambda f: (f / layout.MANIFEST).write_bytes(b"\xff\xfe\x00garbage"), "manifest.json cannot be read"),
    ("manifest of another folder", lambda f: (f / layout.MANIFEST).write_text(
        (f / layout.MANIFEST).read_text().replace(f.name, "v99_20250101_000000")), "version folders must not be renamed"),
]  # fmt: skip


@pytest.mark.parametrize("inject,phrase", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_a_damaged_old_version_is_listed_with_its_problem_and_refused_where_it_would_be_used(registry, inject, phrase):
    v1 = make_scored_version(registry, None)
    v2 = make_scored_version(registry, v1.name)
    inject(registry.root / v1.name)

    # Listing works, marks the damaged version and only it.
    listed = {info.name: info for info in registry.versions()}
    assert list(listed) == [v1.name, v2.name]
    assert phrase in listed[v1.name].problem and listed[v2.name].problem is None
    assert any(phrase in problem for problem in registry.verify(v1.name))
    assert registry.verify(v2.name) == []
    # Loading, and rolling back (forced or not), are refused with the version and the problem named.
    with pytest.raises(RegistryError, match=v1.name) as loading:
        registry.adapter_dir(v1.name)
    assert phrase in str(loading.value)
    with pytest.raises(RegistryError, match=v1.name) as rolling:
        registry.rollback(v1.name, force=True)
    assert phrase in str(rolling.value) and registry.current() == v2.name
    # The healthy current version is untouched: it loads, and runs keep building on it.
    assert registry.adapter_dir(v2.name) == registry.root / v2.name
    assert make_version(registry, v2.name).promoted
    # The doctor reports it as a warning (nothing uses it while it is not current) it cannot repair.
    damaged = doctor(registry)["version-damaged"]
    assert [(f.subject, f.severity, f.repairable) for f in damaged] == [(v1.name, "warning", False)]
    assert phrase in damaged[0].what


@pytest.mark.parametrize("inject,phrase", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_a_damaged_current_version_is_refused_and_reported_as_an_error(registry, inject, phrase):
    v1 = make_scored_version(registry, None)
    v2 = make_scored_version(registry, v1.name)
    inject(registry.root / v2.name)

    assert registry.current() == v2.name  # the pointer still names it: status can say so
    current = [info for info in registry.versions() if info.is_current]
    assert [info.name for info in current] == [v2.name] and phrase in current[0].problem
    with pytest.raises(RegistryError, match=f"{v2.name}.*cannot be loaded") as loading:
        registry.adapter_dir(v2.name)
    assert phrase in str(loading.value) and "incremental rollback" in str(loading.value)
    damaged = doctor(registry)["version-damaged"]
    assert [(f.subject, f.severity) for f in damaged] == [(v2.name, "error")]
    assert f"incremental rollback {v1.name}" in damaged[0].fix
    # Rolling back to the healthy version is the way out.
    assert registry.rollback(v1.name).current == v1.name


def test_a_corrupt_manifest_in_an_old_rejected_version_blocks_nothing_else(registry):
    v1 = make_version(registry, None)
    rejected = make_version(registry, v1.name, status="rejected")
    v3 = make_version(registry, v1.name)
    garble_manifest(registry.root / rejected.name)

    listed = registry.versions()
    assert [info.name for info in listed] == [v1.name, rejected.name, v3.name]
    broken = listed[1]
    assert broken.manifest is None and "cannot be read" in broken.problem and broken.promotion_state is None
    assert registry.versions(check_files=False)[1].problem == broken.problem
    # Everything that does not need it works: current, lineage, history, a new run's reserve and finalize.
    assert registry.current() == v3.name and registry.lineage() == [v3.name, v1.name]
    assert make_version(registry, v3.name).promoted
    # Only what needs it fails, naming it.
    with pytest.raises(RegistryError, match=f"{rejected.name} cannot be used: manifest.json cannot be read"):
        registry.get(rejected.name)
    with pytest.raises(RegistryError, match=rejected.name):
        registry.lineage(rejected.name)


def test_desktop_junk_files_are_ignored_for_loading_and_reported(registry):
    v1 = make_version(registry, None)
    folder = registry.root / v1.name
    for junk in (".DS_Store", "Thumbs.db", "._adapter_model.safetensors"):
        (folder / junk).write_bytes(b"\x00\x05\x16\x07 Finder")

    assert registry.adapter_dir(v1.name) == folder
    assert registry.verify(v1.name) == []
    info = registry.versions()[0]
    assert info.problem is None and set(info.junk) == {".DS_Store", "Thumbs.db", "._adapter_model.safetensors"}
    found = doctor(registry)["version-junk"]
    assert [(f.subject, f.severity, f.repairable) for f in found] == [(v1.name, "info", True)]
    assert repair(found) == [f"removed .DS_Store, ._adapter_model.safetensors, Thumbs.db from {v1.name}"]
    assert sorted(os.listdir(folder)) == sorted([layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS, layout.MANIFEST])
    assert registry.verify(v1.name) == [] and "version-junk" not in doctor(registry)


def test_junk_in_staging_is_left_out_of_the_version(registry):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    (reservation.staging_dir / ".DS_Store").write_bytes(b"Bud1")
    result = registry.finalize(reservation, make_manifest(reservation))
    assert ".DS_Store" not in os.listdir(result.path)
    assert set(registry.get(result.name).manifest.files) == {layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS}


def test_a_manifest_of_schema_2_still_loads_and_its_weights_are_still_checked(registry):
    v1 = make_version(registry, None)
    folder = registry.root / v1.name
    # As release 0.1 wrote it: no `files`, and the decision under the name `promoted`.
    old = json.loads((folder / layout.MANIFEST).read_text())
    del old["files"]
    old["schema_version"] = 2
    old["promotion"] = {"promoted": True, "reason": "gate accepted; promoted over the base model"}
    (folder / layout.MANIFEST).write_text(json.dumps(old))

    info = registry.get(v1.name)
    assert info.manifest.promotion.decision == "promote" and info.promotion_state == "promoted"
    assert registry.adapter_dir(v1.name) == folder
    assert "version-unhashed" in doctor(registry)
    write_adapter(folder, seed=3.0)
    assert registry.verify(v1.name) == [
        "adapter_model.safetensors changed after the version was finalized (its sha256 does not match the manifest)"
    ]


# ---- crashes between finalize's steps ----------------------------------------------------------


def test_a_crash_after_the_rename_before_the_pointer_moved_reads_as_an_interrupted_promotion(registry, monkeypatch):
    import incremental.registry as registry_module

    v1 = make_version(registry, None)
    reservation = registry.reserve(v1.name)
    write_adapter(reservation.staging_dir, 2.0)
    real_write = registry_module._write_atomic

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(registry_module, "_write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        registry.finalize(reservation, make_manifest(reservation))
    monkeypatch.setattr(registry_module, "_write_atomic", real_write)

    # The version is finished, accepted and not current; nothing claims it was promoted.
    info = registry.get(reservation.name)
    assert info.manifest.status == "accepted" and not info.is_current
    assert info.promotion_state == "interrupted" and info.manifest.promotion.decision == "promote"
    assert "promoted" not in json.loads((info.path / layout.MANIFEST).read_text())["promotion"]
    assert registry.current() == v1.name and [h["to"] for h in registry.history()] == [v1.name]
    assert registry.interrupted() == [reservation.name]
    found = doctor(registry)["promotion-interrupted"]
    assert [(f.subject, f.severity, f.repairable) for f in found] == [(reservation.name, "warning", False)]
    assert f"incremental rollback {reservation.name}" in found[0].fix

    # The next run on the still-current parent is promoted, and finalize tells about the earlier one.
    nxt = registry.reserve(v1.name)
    write_adapter(nxt.staging_dir, 3.0)
    result = registry.finalize(nxt, make_manifest(nxt))
    assert result.promoted and result.interrupted == (reservation.name,)
    assert registry.get(reservation.name).promotion_state == "interrupted"
    # Rolling back to it is allowed: it is accepted and healthy.
    assert registry.rollback(reservation.name).current == reservation.name


def test_a_crash_between_the_pointer_and_the_history_is_healed_by_the_next_move_or_the_doctor(registry, monkeypatch):
    from incremental.registry import Registry as RegistryClass

    v1 = make_version(registry, None)
    reservation = registry.reserve(v1.name)
    write_adapter(reservation.staging_dir, 2.0)
    real_append = RegistryClass._append_history

    def killed(self, entry):
        raise OSError(errno.EIO, "killed")

    monkeypatch.setattr(RegistryClass, "_append_history", killed)
    with pytest.raises(OSError):
        registry.finalize(reservation, make_manifest(reservation))
    monkeypatch.setattr(RegistryClass, "_append_history", real_append)

    # The pointer moved, so the promotion happened; the history lacks its line.
    assert registry.current() == reservation.name
    assert registry.get(reservation.name).promotion_state == "promoted"
    assert [h["to"] for h in registry.history()] == [v1.name]
    findings = doctor(registry)
    assert [(f.severity, f.repairable) for f in findings["history-missing-move"]] == [("warning", True)]
    assert "promotion-interrupted" not in findings
    assert repair(findings["history-missing-move"]) == [
        f"appended the pointer's last move (to {reservation.name}) to {layout.HISTORY}"
    ]
    assert [h["to"] for h in registry.history()] == [v1.name, reservation.name]
    assert registry.history()[-1]["action"] == "promote"
    assert diagnose(registry.root.parent, MODEL) == []

    # The same gap is closed by the next pointer move, before it logs its own.
    monkeypatch.setattr(RegistryClass, "_append_history", killed)
    with pytest.raises(OSError):
        registry.rollback(v1.name)
    monkeypatch.setattr(RegistryClass, "_append_history", real_append)
    registry.rollback(reservation.name)
    assert [(h["action"], h["to"]) for h in registry.history()] == [
        ("promote", v1.name), ("promote", reservation.name), ("rollback", v1.name), ("rollback", reservation.name)
    ]


def test_a_pointer_written_before_moves_were_recorded_gets_its_lost_promotion_line_back(registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    # As release 0.1 left it after a crash between the pointer and the history.
    (registry.root / layout.CURRENT_POINTER).write_text(json.dumps({"current": v2.name, "updated_at": "2025-11-05T14:00:00+00:00"}))
    lines = (registry.root / layout.HISTORY).read_text().splitlines()
    (registry.root / layout.HISTORY).write_text(lines[0] + "\n")

    assert registry.get(v2.name).promotion_state == "promoted"
    found = doctor(registry)["history-missing-promotion"]
    assert repair(found) == [f"appended the promotion of {v2.name} to {layout.HISTORY}"]
    assert [(h["action"], h["from"], h["to"]) for h in registry.history()] == [("promote", None, v1.name), ("promote", v1.name, v2.name)]


def test_torn_history_lines_are_moved_out_and_kept(registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    history = registry.root / layout.HISTORY
    text = history.read_text()
    history.write_text(text + '{"action": "rollback", "fr')  # a crash mid-append
    registry.rollback(v1.name)  # appends on a fresh line
    entries = registry.history()

    found = doctor(registry)["history-torn"]
    assert [(f.severity, f.repairable) for f in found] == [("warning", True)] and "line 3" in found[0].what
    assert repair(found) == [f"took 1 torn line(s) out of {layout.HISTORY} (kept in {layout.HISTORY_TORN})"]
    assert registry.history_lines() == (entries, [])
    assert (registry.root / layout.HISTORY_TORN).read_text() == '{"action": "rollback", "fr\n'
    assert [h["to"] for h in entries] == [v1.name, v2.name, v1.name]


# ---- the pointer -------------------------------------------------------------------------------


def test_an_unreadable_pointer_is_rebuilt_from_the_history(registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    (registry.root / layout.CURRENT_POINTER).write_text('{"current": "v2_2025')
    with pytest.raises(RegistryError, match="not valid JSON"):
        registry.current()
    assert [info.name for info in registry.versions()] == [v1.name, v2.name]  # listing still works

    found = doctor(registry)["pointer-unreadable"]
    assert [(f.severity, f.repairable) for f in found] == [("error", True)] and v2.name in found[0].fix
    assert repair(found) == [f"rewrote {layout.CURRENT_POINTER} from the last history entry (current: {v2.name})"]
    assert registry.current() == v2.name and diagnose(registry.root.parent, MODEL) == []


def test_a_candidate_finalized_while_the_pointer_is_unreadable_is_kept_not_promoted(registry):
    v1 = make_version(registry, None)
    reservation = registry.reserve(v1.name)
    write_adapter(reservation.staging_dir, 2.0)
    (registry.root / layout.CURRENT_POINTER).write_text("{")
    result = registry.finalize(reservation, make_manifest(reservation))
    assert (result.status, result.promoted) == ("rejected", False) and "pointer cannot be read" in result.reason
    assert registry.get(reservation.name).promotion_state == "kept"


def test_rollback_replaces_an_unreadable_pointer(registry):
    v1 = make_version(registry, None)
    (registry.root / layout.CURRENT_POINTER).write_bytes(b"\x00\x00\x00")
    result = registry.rollback(v1.name, reason="repair")
    assert result.changed and "unreadable pointer" in result.message and registry.current() == v1.name


def test_a_pointer_to_a_missing_version_is_an_error_the_doctor_leaves_to_a_person(registry, tmp_path):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    os.rename(registry.root / v2.name, tmp_path / "moved-away")
    findings = doctor(registry)
    missing = findings["pointer-missing-version"]
    assert [(f.severity, f.repairable) for f in missing] == [("error", False)]
    assert f"incremental rollback {v1.name}" in missing[0].fix
    assert [f.subject for f in findings["history-unknown-version"]] == [v2.name]


def test_a_pointer_to_a_rejected_version_is_reported_unless_a_forced_rollback_put_it_there(registry):
    v1 = make_version(registry, None)
    rejected = make_version(registry, v1.name, status="rejected")
    (registry.root / layout.CURRENT_POINTER).write_text(json.dumps({"current": rejected.name}))
    assert [f.severity for f in doctor(registry)["pointer-rejected"]] == ["warning"]
    registry.rollback(v1.name)
    registry.rollback(rejected.name, force=True)
    assert "pointer-rejected" not in doctor(registry)


# ---- leftovers ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(child.stdout)


def _set_owner(reservation, **fields) -> None:
    path = layout.owner_file(reservation.staging_dir)
    owner = json.loads(path.read_text())
    owner.update(fields)
    path.write_text(json.dumps(owner))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for entry in [path, *path.iterdir()] if path.is_dir() else [path]:
        os.utime(entry, (then, then), follow_symlinks=False)


# (id, how the reservation is left, expected kind, repairable)
STAGING_CASES = [
    ("this process holds it", lambda r: None, "staging-live", False),
    ("its process ended", lambda r: _set_owner(r, pid=_dead_pid()), "staging-dead", True),
    ("its pid now belongs to a younger process", lambda r: _set_owner(r, pid=os.getpid(), reserved_at=1.0), "staging-dead", True),
    ("another host, recently", lambda r: _set_owner(r, host="gpu-worker-7"), "staging-unknown", False),
    ("another host, two days ago", lambda r: (_set_owner(r, host="gpu-worker-7"), _age(r.staging_dir, 2 * DAY)), "staging-dead", True),
    ("no owner file, two days ago", lambda r: (layout.owner_file(r.staging_dir).unlink(), _age(r.staging_dir, 2 * DAY)), "staging-dead", True),
]  # fmt: skip


@pytest.mark.parametrize("leave,kind,repairable", [c[1:] for c in STAGING_CASES], ids=[c[0] for c in STAGING_CASES])
def test_staging_leftovers_of_dead_runs_are_removed_and_live_ones_kept(registry, leave, kind, repairable):
    v1 = make_version(registry, None)
    reservation = registry.reserve(v1.name)
    write_adapter(reservation.staging_dir)
    owner = json.loads(layout.owner_file(reservation.staging_dir).read_text())
    assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
    leave(reservation)

    findings = doctor(registry)
    assert [(f.subject, f.repairable) for f in findings[kind]] == [(f"{layout.STAGING_DIR}/{reservation.name}", repairable)]
    done = repair([f for group in findings.values() for f in group])
    assert reservation.staging_dir.exists() is not repairable
    assert layout.owner_file(reservation.staging_dir).exists() is (not repairable and kind != "staging-dead")
    if repairable:
        assert done == [f"removed {layout.STAGING_DIR}/{reservation.name} (left by a run that died)"]
        assert registry.reserve(v1.name).number == 2  # the number of a run that never finished is free again
    else:
        assert done == [] and registry.finalize(reservation, make_manifest(reservation)).promoted


def test_release_and_finalize_remove_the_owner_file(registry):
    released = registry.reserve(None)
    registry.release(released)
    kept = registry.reserve(None)
    write_adapter(kept.staging_dir)
    registry.finalize(kept, make_manifest(kept))
    assert list((registry.root / layout.STAGING_DIR).iterdir()) == []


def test_stray_temp_files_and_orphan_owner_files_are_removed(registry):
    v1 = make_version(registry, None)
    stray = registry.root / f".{layout.CURRENT_POINTER}.4242.tmp"
    stray.write_text('{"current": "v2_')
    fresh = registry.root / f".{layout.CURRENT_POINTER}.4343.tmp"  # a move happening right now
    fresh.write_text("{}")
    _age(stray, 3600)
    orphan = registry.root / layout.STAGING_DIR / f"v5_20251105_140000{layout.OWNER_SUFFIX}"
    orphan.write_text("{}")

    findings = doctor(registry)
    assert [f.subject for f in findings["temp-file"]] == [stray.name]
    assert [f.subject for f in findings["staging-orphan-owner"]] == [f"{layout.STAGING_DIR}/{orphan.name}"]
    repair([f for group in findings.values() for f in group])
    assert not stray.exists() and fresh.exists() and not orphan.exists()
    assert registry.current() == v1.name


def test_a_version_folder_without_manifest_is_reported_and_never_removed(registry):
    v1 = make_version(registry, None)
    crashed = registry.root / "v7_20251105_150000"
    crashed.mkdir()
    write_adapter(crashed)
    found = doctor(registry)["version-without-manifest"]
    assert [(f.subject, f.severity, f.repairable) for f in found] == [(crashed.name, "warning", False)]
    assert repair(found) == [] and crashed.is_dir()
    assert [info.name for info in registry.versions()] == [v1.name]


def test_repairing_everything_in_a_messy_tree_never_deletes_or_edits_a_finished_version(registry, monkeypatch):
    import incremental.registry as registry_module

    v1 = make_scored_version(registry, None)
    v2 = make_scored_version(registry, v1.name)
    v3 = make_version(registry, v2.name, status="rejected")
    interrupted = registry.reserve(v2.name)
    write_adapter(interrupted.staging_dir)
    monkeypatch.setattr(registry_module, "_write_atomic", lambda path, text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        registry.finalize(interrupted, make_manifest(interrupted))
    monkeypatch.undo()
    dead = registry.reserve(v2.name)
    _set_owner(dead, pid=_dead_pid())
    flip_bit(registry.root / v1.name / layout.ADAPTER_WEIGHTS)
    garble_manifest(registry.root / v3.name)
    (registry.root / v2.name / ".DS_Store").write_bytes(b"Bud1")
    (registry.root / layout.HISTORY).write_text((registry.root / layout.HISTORY).read_text() + '{"to": "v')
    before = {
        name: {p.name: p.read_bytes() for p in (registry.root / name).iterdir() if not layout.is_junk(p.name)}
        for name in (v1.name, v2.name, v3.name, interrupted.name)
    }

    findings = diagnose(registry.root.parent, MODEL)
    assert [f.severity for f in findings] == sorted((f.severity for f in findings), key=["error", "warning", "info"].index)
    assert {f.kind for f in findings} >= {"version-damaged", "promotion-interrupted", "staging-dead", "version-junk", "history-torn"}
    repair(findings)
    after = {name: {p.name: p.read_bytes() for p in (registry.root / name).iterdir()} for name in before}
    assert after == before
    assert registry.current() == v2.name
    left = kinds(diagnose(registry.root.parent, MODEL))
    assert set(left) == {"version-damaged", "promotion-interrupted"}  # for a person to decide


# ---- the ledger --------------------------------------------------------------------------------


def test_the_doctor_compares_each_version_with_the_rows_the_database_recorded(registry, store):
    first, second = ids_in("train", 2, "t")
    store.add_many([feedback_row(id=first), feedback_row(id=second, prompt="Another meeting.")])
    names = []
    for _ in range(3):
        reservation = registry.reserve(names[-1] if names else None)
        write_adapter(reservation.staging_dir)
        manifest = make_manifest(reservation)
        data = manifest.data.model_copy(update={"new_ids": (first,), "replay_ids": ()})
        registry.finalize(reservation, manifest.model_copy(update={"data": data}))
        names.append(reservation.name)
    store.record_consumption(MODEL, names[0], new_ids=[first], replay_ids=[])  # as the flow records it
    store.record_consumption(MODEL, names[1], new_ids=[second], replay_ids=[])  # not what v2's manifest says

    findings = doctor(registry, db_path=store.path)
    assert [(f.subject, f.severity) for f in findings["ledger-mismatch"]] == [(names[1], "error")]
    assert [(f.subject, f.severity) for f in findings["ledger-missing"]] == [(names[2], "warning")]
    assert not any(f.repairable for group in findings.values() for f in group)


def test_a_healthy_tree_has_no_findings(registry):
    assert diagnose(registry.root.parent, MODEL) == []  # no tree at all
    v1 = make_scored_version(registry, None)
    make_scored_version(registry, v1.name, status="rejected")
    registry.rollback(None)
    registry.rollback(v1.name)
    assert diagnose(registry.root.parent, MODEL) == []
    assert isinstance(Manifest.read(registry.root / v1.name / layout.MANIFEST).files, dict)
