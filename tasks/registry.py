"""Registry tasks: which version a run builds on, reserving its name, finalizing and promoting it,
and undoing a run that failed before its version appeared."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from incremental.manifest import Manifest
from incremental.registry import FinalizeResult, ParentVersion, Registry, Reservation
from incremental.settings import Settings
from incremental.waiting import times_waited
from tasks.feedback import open_store


@task(name="resolve-parent", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def resolve_parent(settings: Settings, model: str) -> ParentVersion:
    """The current accepted version (read from the folder tree), its lineage, base model and prompt layout."""
    return Registry(settings.models_root, model).parent(new_lineage_layout=settings.prompt_layout)


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


@task(name="abandon-version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def abandon_version(settings: Settings, model: str, reservation: Reservation, reason: str) -> bool:
    """Undo what a failed run wrote for a version that never appeared: its staging folder, its
    consumption record, its holds (`Registry.abandon`, `FeedbackStore.forget_unfinished`). A version
    that did appear is left as it is. Returns whether anything was undone."""
    if not Registry(settings.models_root, model).abandon(reservation):
        return False
    open_store(settings).forget_unfinished(model, reservation.name, reason=reason)
    return True


@task(name="count-waits", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def count_waits(settings: Settings, model: str, parent: str | None) -> dict[str, int]:
    """How many undecided candidates of `parent` already trained each row (read-only, from the manifests)."""
    return dict(times_waited(Registry(settings.models_root, model).versions(check_files=False), parent))
