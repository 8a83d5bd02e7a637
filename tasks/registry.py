"""Registry tasks: which version a run builds on, reserving its name, finalizing and promoting it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.manifest import BaseModelRef, Manifest
from incremental.registry import FinalizeResult, Registry, Reservation
from incremental.settings import Settings


@dataclass(frozen=True)
class Parent:
    """The accepted version a run continues from; all None/empty in base mode."""

    name: str | None
    adapter_dir: Path | None
    lineage: tuple[str, ...]
    base: BaseModelRef | None
    accepted_at: datetime | None = None  # feedback that arrived by then is trusted for judging its children


@task(name="resolve-parent", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def resolve_parent(settings: Settings, model: str) -> Parent:
    """The current accepted version (read from the folder tree), its lineage and its base model."""
    registry = Registry(settings.models_root, model)
    name = registry.current()
    if name is None:
        return Parent(name=None, adapter_dir=None, lineage=(), base=None)
    version = registry.get(name)
    return Parent(
        name=name,
        adapter_dir=registry.adapter_dir(name),
        lineage=tuple(registry.lineage(name)),
        base=version.manifest.base_model,
        accepted_at=version.manifest.finalized_at,
    )


@task(name="reserve-version", cache_policy=NO_CACHE)
def reserve_version(settings: Settings, model: str, parent: str | None) -> Reservation:
    return Registry(settings.models_root, model).reserve(parent)


@task(name="release-version", cache_policy=NO_CACHE)
def release_version(settings: Settings, model: str, reservation: Reservation) -> None:
    Registry(settings.models_root, model).release(reservation)


@task(name="finalize-version", cache_policy=NO_CACHE)
def finalize_version(settings: Settings, model: str, reservation: Reservation, manifest: Manifest) -> FinalizeResult:
    """Make the version folder appear (immutable) and, if the gate accepted it, compare-and-swap the pointer."""
    return Registry(settings.models_root, model).finalize(reservation, manifest)
