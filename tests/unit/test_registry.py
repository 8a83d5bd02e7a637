"""The version registry on real folders: naming, immutability, compare-and-swap promotion, rollback."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from safetensors.numpy import save_file

from incremental import layout
from incremental.errors import RegistryError
from incremental.manifest import BaseModelRef, DataRecord, GateRecord, Manifest, TrainingRecord
from incremental.registry import Registry, Reservation

MODEL = "tiny"
T0 = datetime(2025, 11, 5, 14, 0, 0, tzinfo=timezone.utc)


def make_manifest(reservation: Reservation, status: str = "accepted", model: str = MODEL) -> Manifest:
    return Manifest(
        name=reservation.name,
        model=model,
        parent=reservation.parent,
        status=status,
        created_at=reservation.created_at,
        base_model=BaseModelRef(id="embedded", revision="0" * 40),
        run_config={"lora": {"r": 4}},
        libraries={"peft": "0.21.2"},
        data=DataRecord(
            dataset_hash="a" * 64,
            eval_snapshot_hash="b" * 64,
            new_ids=("row-1",),
            replay_ids=(),
            eval_ids=("row-9",),
            n_train_examples=1,
        ),
        training=TrainingRecord(
            mode="base" if reservation.parent is None else "incremental",
            device="cpu",
            quantization="none",
            steps=1,
            epochs=1.0,
            train_loss=1.0,
            trainable_parameters=16,
            target_tokens=4,
            wall_seconds=0.1,
        ),
        scores={"candidate": {"nll": 1.0}, "parent": {"nll": 1.1}},
        gate=GateRecord(verdict="accept" if status == "accepted" else "reject", reasons=("test",), policy={}),
    )


def write_adapter(folder: Path, seed: float = 1.0) -> None:
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": np.full((2, 8), seed, dtype=np.float32),
        "base_model.model.layers.0.q_proj.lora_B.weight": np.zeros((8, 2), dtype=np.float32),
    }
    save_file(tensors, str(folder / layout.ADAPTER_WEIGHTS))
    (folder / layout.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2}), encoding="utf-8")


def make_version(registry: Registry, parent: str | None, status: str = "accepted", now: datetime | None = None):
    reservation = registry.reserve(parent, now=now)
    write_adapter(reservation.staging_dir)
    return registry.finalize(reservation, make_manifest(reservation, status))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "finetuned_models", MODEL)


# ---- names and numbering ---------------------------------------------------------------------


def test_names_follow_the_pattern_and_numbers_increase_past_rejected_and_crashed_runs(registry: Registry, tmp_path: Path):
    v1 = make_version(registry, None, now=T0)
    assert v1.name == "v1_20251105_140000"
    v2 = make_version(registry, v1.name, status="rejected")
    assert layout.VERSION_NAME.match(v2.name) and layout.version_number(v2.name) == 2
    crashed = registry.reserve(v1.name)  # a run that died: never finalized, never released
    assert crashed.number == 3
    write_adapter(crashed.staging_dir)

    reopened = Registry(tmp_path / "finetuned_models", MODEL)
    nxt = reopened.reserve(v1.name, now=datetime(2025, 11, 6, 9, 30, 5, tzinfo=timezone.utc))
    assert (nxt.number, nxt.name) == (4, "v4_20251106_093005")
    assert [v.name for v in reopened.versions()] == [v1.name, v2.name]


def test_a_naive_time_is_taken_as_utc_and_an_aware_one_converted(registry: Registry):
    naive = registry.reserve(None, now=datetime(2025, 1, 2, 3, 4, 5))
    assert naive.name == "v1_20250102_030405"
    aware = registry.reserve(None, now=datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))))
    assert aware.name == "v2_20250102_030405"


def test_staging_and_folders_without_manifest_are_never_listed(registry: Registry):
    v1 = make_version(registry, None)
    pending = registry.reserve(v1.name)
    write_adapter(pending.staging_dir)
    # A crash after the adapter was written but before the manifest: the folder has no manifest.
    crashed = registry.root / "v7_20251105_150000"
    crashed.mkdir()
    write_adapter(crashed)

    assert [v.name for v in registry.versions()] == [v1.name]
    with pytest.raises(RegistryError, match="not a finished version"):
        registry.get(crashed.name)
    with pytest.raises(RegistryError, match="not a finished version"):
        registry.get(pending.name)
    with pytest.raises(RegistryError):
        registry.adapter_dir(crashed.name)
    # Its number is still taken: names never repeat a number.
    assert registry.reserve(v1.name).number == 8


def test_release_removes_the_staging_folder(registry: Registry):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    registry.release(reservation)
    assert not reservation.staging_dir.exists()
    with pytest.raises(RegistryError, match="released or never reserved"):
        registry.finalize(reservation, make_manifest(reservation))


# ---- finalize --------------------------------------------------------------------------------


def test_finalize_writes_an_immutable_folder_with_the_manifest_filled_in(registry: Registry):
    reservation = registry.reserve(None, now=T0)
    write_adapter(reservation.staging_dir)
    result = registry.finalize(reservation, make_manifest(reservation))

    assert result.promoted and result.status == "accepted"
    assert result.path == registry.root / reservation.name
    assert not reservation.staging_dir.exists()
    assert sorted(os.listdir(result.path)) == sorted({layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS, layout.MANIFEST})
    manifest = Manifest.read(result.path / layout.MANIFEST)
    assert manifest.adapter_sha256 == hashlib.sha256((result.path / layout.ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    assert manifest.files == {
        name: hashlib.sha256((result.path / name).read_bytes()).hexdigest()
        for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS)
    }
    # The manifest records the decision; the pointer and the history say it happened.
    assert manifest.finalized_at is not None and manifest.promotion is not None and manifest.promotion.decision == "promote"
    assert "promoted" not in json.loads((result.path / layout.MANIFEST).read_text())["promotion"]
    assert registry.get(reservation.name).promotion_state == "promoted"
    text = (result.path / layout.MANIFEST).read_text(encoding="utf-8")
    assert text == manifest.to_json()  # sorted keys, as Manifest writes it
    assert registry.current() == reservation.name
    assert registry.history()[-1] | {"at": None} == {
        "at": None,
        "action": "promote",
        "from": None,
        "to": reservation.name,
        "reason": result.reason,
    }


def test_finalizing_twice_is_refused(registry: Registry):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    registry.finalize(reservation, make_manifest(reservation))
    before = (registry.root / reservation.name / layout.MANIFEST).read_bytes()
    with pytest.raises(RegistryError, match="already finalized"):
        registry.finalize(reservation, make_manifest(reservation, status="rejected"))
    assert (registry.root / reservation.name / layout.MANIFEST).read_bytes() == before


def test_finalizing_over_an_existing_folder_is_refused(registry: Registry):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    (registry.root / reservation.name).mkdir()
    with pytest.raises(RegistryError, match="already finalized"):
        registry.finalize(reservation, make_manifest(reservation))
    assert registry.current() is None


@pytest.mark.parametrize("extra", ["adapter_model.bin", "training_args.pt", "optimizer.pkl"])
def test_a_pickle_file_in_staging_is_refused(registry: Registry, extra: str):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    (reservation.staging_dir / extra).write_bytes(b"\x80\x04pickled")
    with pytest.raises(RegistryError, match="pickle"):
        registry.finalize(reservation, make_manifest(reservation))
    assert registry.versions() == [] and registry.current() is None


def test_a_pickle_renamed_to_safetensors_and_unknown_files_are_refused(registry: Registry):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    (reservation.staging_dir / "notes.txt").write_text("hi")
    with pytest.raises(RegistryError, match="notes.txt"):
        registry.finalize(reservation, make_manifest(reservation))
    (reservation.staging_dir / "notes.txt").unlink()
    (reservation.staging_dir / layout.ADAPTER_WEIGHTS).write_bytes(b"\x80\x04\x95pickled" * 10)
    with pytest.raises(RegistryError, match="not a safetensors file"):
        registry.finalize(reservation, make_manifest(reservation))


def test_missing_adapter_files_and_mismatched_manifests_are_refused(registry: Registry):
    reservation = registry.reserve(None)
    with pytest.raises(RegistryError, match=layout.ADAPTER_CONFIG):
        registry.finalize(reservation, make_manifest(reservation))
    write_adapter(reservation.staging_dir)
    with pytest.raises(RegistryError, match="model="):
        registry.finalize(reservation, make_manifest(reservation, model="other"))
    inconsistent = make_manifest(reservation).model_copy(
        update={"gate": GateRecord(verdict="reject", reasons=("nan",), policy={})}
    )
    with pytest.raises(RegistryError, match="gate's verdict"):
        registry.finalize(reservation, inconsistent)
    assert registry.versions() == []


# ---- promotion -------------------------------------------------------------------------------


def test_a_gate_rejected_version_never_becomes_current(registry: Registry):
    result = make_version(registry, None, status="rejected")
    assert (result.status, result.promoted, result.reason) == ("rejected", False, "gate rejected")
    assert registry.current() is None
    assert registry.history() == []
    v1 = make_version(registry, None)
    rejected = make_version(registry, v1.name, status="rejected")
    assert registry.current() == v1.name
    info = registry.get(rejected.name)
    assert info.manifest.status == "rejected" and not info.is_current and info.promotion_state == "kept"
    assert info.manifest.promotion is not None and info.manifest.promotion.reason == "gate rejected"


def test_compare_and_swap_promotes_only_the_first_of_two_candidates_on_the_same_parent(registry: Registry):
    v1 = make_version(registry, None)
    first = registry.reserve(v1.name)
    second = registry.reserve(v1.name)
    write_adapter(first.staging_dir, 2.0)
    write_adapter(second.staging_dir, 3.0)

    won = registry.finalize(second, make_manifest(second))
    lost = registry.finalize(first, make_manifest(first))

    assert won.promoted and won.status == "accepted" and won.current == second.name
    # The loser reports what is current now (its caller's log line says so), not its stale parent.
    assert not lost.promoted and lost.status == "rejected" and lost.current == second.name
    assert lost.reason == f"parent {v1.name} is no longer current (now {second.name}): re-run to evaluate against it"
    assert registry.current() == second.name
    manifest = registry.get(first.name).manifest
    assert manifest.status == "rejected" and manifest.promotion is not None
    assert manifest.promotion.decision == "keep" and second.name in manifest.promotion.reason
    assert [h["to"] for h in registry.history()] == [v1.name, second.name]


def test_compare_and_swap_in_base_mode(registry: Registry):
    a = registry.reserve(None)
    b = registry.reserve(None)
    write_adapter(a.staging_dir)
    write_adapter(b.staging_dir)
    assert registry.finalize(a, make_manifest(a)).promoted
    lost = registry.finalize(b, make_manifest(b))
    assert not lost.promoted and "the base model is no longer current" in lost.reason and a.name in lost.reason


def _finalize_in_process(models_root: str, reservation: Reservation, manifest_json: str, go_file: str) -> tuple[str, bool]:
    Path(go_file + "." + reservation.name).touch()
    deadline = time.monotonic() + 30
    while not Path(go_file).exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    result = Registry(Path(models_root), MODEL).finalize(reservation, Manifest.model_validate_json(manifest_json))
    return result.name, result.promoted


def test_concurrent_finalize_from_processes_promotes_exactly_one(registry: Registry, tmp_path: Path):
    v1 = make_version(registry, None)
    reservations = [registry.reserve(v1.name) for _ in range(4)]
    for n, reservation in enumerate(reservations):
        write_adapter(reservation.staging_dir, float(n))
    go = tmp_path / "go"
    with ProcessPoolExecutor(max_workers=len(reservations)) as pool:
        futures = [
            pool.submit(_finalize_in_process, str(registry.root.parent), r, make_manifest(r).model_dump_json(), str(go))
            for r in reservations
        ]
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("go.*"))) < len(reservations) and time.monotonic() < deadline:
            time.sleep(0.005)
        go.touch()
        outcomes = dict(f.result(timeout=60) for f in futures)

    winners = [name for name, promoted in outcomes.items() if promoted]
    assert len(winners) == 1
    assert registry.current() == winners[0]
    for info in registry.versions()[1:]:
        assert info.manifest.status == ("accepted" if info.name == winners[0] else "rejected")
    assert [h["to"] for h in registry.history() if h["action"] == "promote"] == [v1.name, winners[0]]


def test_concurrent_finalize_from_threads_promotes_exactly_one(registry: Registry):
    reservations = [registry.reserve(None) for _ in range(6)]
    for reservation in reservations:
        write_adapter(reservation.staging_dir)
    barrier = threading.Barrier(len(reservations))

    def run(reservation: Reservation):
        barrier.wait()
        return Registry(registry.root.parent, MODEL).finalize(reservation, make_manifest(reservation))

    with ThreadPoolExecutor(max_workers=len(reservations)) as pool:
        results = list(pool.map(run, reservations))
    assert sum(r.promoted for r in results) == 1
    assert len(registry.versions()) == len(reservations)


def test_finalizing_the_same_reservation_from_two_threads_makes_one_version(registry: Registry):
    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    barrier = threading.Barrier(2)

    def run(_):
        barrier.wait()
        try:
            return registry.finalize(reservation, make_manifest(reservation))
        except RegistryError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(run, range(2)))
    assert sum(isinstance(o, RegistryError) for o in outcomes) == 1
    assert len(registry.history()) == 1


def test_a_reservation_finalized_while_another_run_hashes_it_is_refused_clearly(registry: Registry, monkeypatch):
    """The hash runs outside the lock; the other run's rename in that window must not surface as FileNotFoundError."""
    import incremental.registry as registry_module

    reservation = registry.reserve(None)
    write_adapter(reservation.staging_dir)
    hashing, finalized = threading.Event(), threading.Event()
    real_sha256 = registry_module._sha256

    def slow_sha256(path):
        if threading.current_thread().name == "slow":
            hashing.set()
            assert finalized.wait(30)
        return real_sha256(path)

    monkeypatch.setattr(registry_module, "_sha256", slow_sha256)
    outcome = {}

    def slow_run():
        try:
            outcome["slow"] = registry.finalize(reservation, make_manifest(reservation))
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            outcome["slow"] = exc

    slow = threading.Thread(target=slow_run, name="slow")
    slow.start()
    assert hashing.wait(30)
    registry.finalize(reservation, make_manifest(reservation))
    finalized.set()
    slow.join(30)
    assert isinstance(outcome["slow"], RegistryError) and "already finalized" in str(outcome["slow"])
    assert len(registry.history()) == 1


def test_a_held_lock_times_out_with_a_clear_error(tmp_path: Path):
    registry = Registry(tmp_path, MODEL, lock_timeout_s=0.2)
    registry.root.mkdir()
    with FileLock(registry.root / layout.LOCK_FILE):
        with pytest.raises(RegistryError, match="held by another run"):
            registry.reserve(None)


# ---- the pointer, rollback and lineage -------------------------------------------------------


def test_the_pointer_survives_reopening_the_registry(registry: Registry, tmp_path: Path):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    reopened = Registry(tmp_path / "finetuned_models", MODEL)
    assert reopened.current() == v2.name
    assert [v.is_current for v in reopened.versions()] == [False, True]
    assert json.loads((registry.root / layout.CURRENT_POINTER).read_text())["current"] == v2.name


def test_a_pointer_to_a_missing_version_is_an_error_not_base_mode(registry: Registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    (registry.root / v2.name / layout.MANIFEST).unlink()
    with pytest.raises(RegistryError, match="missing or incomplete"):
        registry.current()
    # Listing and rollback still work, so the pointer can be repaired.
    assert [v.name for v in registry.versions()] == [v1.name]
    assert registry.rollback(v1.name).current == v1.name
    assert registry.current() == v1.name


def test_rollback_to_an_accepted_version_moves_the_pointer_and_is_recorded(registry: Registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    result = registry.rollback(v1.name, reason="v2 writes worse ERDs")
    assert (result.previous, result.current, result.changed, result.forced) == (v2.name, v1.name, True, False)
    assert registry.current() == v1.name
    last = registry.history()[-1]
    assert {k: last[k] for k in ("action", "from", "to", "forced", "reason")} == {
        "action": "rollback",
        "from": v2.name,
        "to": v1.name,
        "forced": False,
        "reason": "v2 writes worse ERDs",
    }


def test_rollback_targets_are_the_other_accepted_versions_newest_first(registry: Registry):
    assert (registry.next_number(), registry.rollback_targets()) == (1, [])
    v1 = make_version(registry, None, now=T0)
    v2 = make_version(registry, v1.name, now=T0 + timedelta(hours=1))
    make_version(registry, v2.name, status="rejected", now=T0 + timedelta(hours=2))
    assert registry.rollback_targets() == [v1.name]  # not the current v2, never the rejected v3
    registry.rollback(v1.name)
    assert registry.rollback_targets() == [v2.name]
    assert registry.next_number() == 4


def test_rollback_to_the_current_version_is_a_reported_no_op(registry: Registry):
    v1 = make_version(registry, None)
    lines = registry.history()
    result = registry.rollback(v1.name)
    assert not result.changed and "already current" in result.message
    assert registry.history() == lines


def test_rollback_to_a_rejected_version_needs_force(registry: Registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name, status="rejected")
    with pytest.raises(RegistryError, match="--force"):
        registry.rollback(v2.name)
    assert registry.current() == v1.name
    result = registry.rollback(v2.name, force=True, reason="debugging")
    assert result.forced and registry.current() == v2.name
    assert registry.history()[-1]["forced"] is True


def test_rollback_to_an_unknown_version_is_refused(registry: Registry):
    v1 = make_version(registry, None)
    with pytest.raises(RegistryError, match=v1.name):
        registry.rollback("v9_20251105_140000")
    with pytest.raises(RegistryError):
        registry.rollback("../../etc")


def test_rollback_to_base_mode(registry: Registry):
    v1 = make_version(registry, None)
    result = registry.rollback(None, reason="start over")
    assert result.changed and registry.current() is None and registry.lineage() == []
    assert registry.history()[-1]["to"] is None
    assert not registry.get(v1.name).is_current
    # The next base-mode candidate is promoted over the base model; numbering continues.
    v2 = make_version(registry, None)
    assert v2.promoted and layout.version_number(v2.name) == 2


def test_lineage_follows_parents_and_restarts_after_rollback(registry: Registry):
    assert registry.lineage() == []
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    v3 = make_version(registry, v2.name)
    assert registry.lineage() == [v3.name, v2.name, v1.name]
    registry.rollback(v1.name)
    v4 = make_version(registry, v1.name)
    assert layout.version_number(v4.name) == 4 and v4.promoted
    assert registry.lineage(v4.name) == [v4.name, v1.name]
    assert registry.lineage() == [v4.name, v1.name]
    assert registry.lineage(v3.name) == [v3.name, v2.name, v1.name]


def test_lineage_with_a_missing_parent_is_an_error(registry: Registry):
    v1 = make_version(registry, None)
    v2 = make_version(registry, v1.name)
    (registry.root / v1.name / layout.MANIFEST).unlink()
    with pytest.raises(RegistryError, match="broken"):
        registry.lineage(v2.name)


def test_reserve_refuses_an_unknown_parent(registry: Registry):
    with pytest.raises(RegistryError, match="not a finished version"):
        registry.reserve("v1_20251105_140000")


# ---- loading ---------------------------------------------------------------------------------


def test_adapter_dir_returns_a_complete_version(registry: Registry):
    v1 = make_version(registry, None)
    assert registry.adapter_dir(v1.name) == registry.root / v1.name


def test_adapter_dir_refuses_pickles_links_and_tampered_weights(registry: Registry, tmp_path: Path):
    v1 = make_version(registry, None)
    folder = registry.root / v1.name
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(RegistryError, match="pickle"):
        registry.adapter_dir(v1.name)
    (folder / "adapter_model.bin").unlink()

    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((folder / layout.ADAPTER_WEIGHTS).read_bytes())
    (folder / layout.ADAPTER_WEIGHTS).unlink()
    (folder / layout.ADAPTER_WEIGHTS).symlink_to(outside)
    with pytest.raises(RegistryError, match="link"):
        registry.adapter_dir(v1.name)
    (folder / layout.ADAPTER_WEIGHTS).unlink()

    write_adapter(folder, seed=5.0)
    with pytest.raises(RegistryError, match="sha256"):
        registry.adapter_dir(v1.name)


def test_adapter_dir_refuses_a_version_folder_linked_from_outside(registry: Registry, tmp_path: Path):
    v1 = make_version(registry, None)
    foreign = tmp_path / "foreign" / "v2_20251105_140000"
    foreign.parent.mkdir()
    os.rename(registry.root / v1.name, foreign)
    (registry.root / v1.name).symlink_to(foreign)
    with pytest.raises(RegistryError, match="outside"):
        registry.adapter_dir(v1.name)


def test_model_names_are_validated():
    with pytest.raises(ValueError, match="model"):
        Registry(Path("/tmp"), "../escape")
    with pytest.raises(ValueError, match="model"):
        Registry(Path("/tmp"), "CodeLlama")


def test_an_empty_registry_is_base_mode(tmp_path: Path):
    registry = Registry(tmp_path, MODEL)
    assert registry.current() is None
    assert registry.versions() == [] and registry.history() == [] and registry.lineage() == []
    assert not registry.root.exists()  # reading creates nothing
