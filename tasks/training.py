"""Training tasks: resolve the base model, then train the candidate from the parent's adapter."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from incremental.config import RunConfig
from incremental.dataset import DatasetSnapshot
from incremental.distributed import train_distributed
from incremental.manifest import TrainingRecord
from incremental.modeling import Hardware, ResolvedBase, resolve_base_for
from incremental.registry import ParentVersion, Registry
from incremental.settings import Settings
from incremental.threads import apply_threads
from incremental.throughput import PEAK_FILE
from incremental.training import train_candidate as train_candidate_stage

PROGRESS_EVERY_S = 2.0


@task(name="prepare-base", cache_policy=NO_CACHE)
def prepare_base(settings: Settings, parent: ParentVersion) -> ResolvedBase:
    """The base named by the settings (built on first use if embedded); it must be the parent's base."""
    apply_threads(settings)  # building the embedded base pretrains it: minutes of torch on first use
    return resolve_base_for(settings, parent.name, parent.base)


@task(name="train-candidate", cache_policy=NO_CACHE)
def train_candidate(
    settings: Settings,
    base: ResolvedBase,
    parent: ParentVersion,
    snapshot: DatasetSnapshot,
    config: RunConfig,
    output_dir: Path,
) -> TrainingRecord:
    threads = apply_threads(settings)
    if parent.adapter_dir is not None:
        # Checked again here, minutes after the parent was resolved: a version damaged meanwhile
        # (a file changed by hand, a disk error) is refused by name before anything trains on it.
        Registry(parent.adapter_dir.parent.parent, parent.adapter_dir.parent.name).adapter_dir(parent.adapter_dir.name)
    progress_id = create_progress_artifact(0.0, description="Training progress (optimizer steps)")
    last_update = [0.0]

    def report(step: int, total: int) -> None:
        # At most one API call every 2 s (and the last step): each costs ~8 ms of the run (BENCHMARKS.md, flow overhead).
        now = time.monotonic()
        if now - last_update[0] >= PROGRESS_EVERY_S or step >= total:
            last_update[0] = now
            update_progress_artifact(progress_id, 100.0 * step / max(total, 1))

    hardware = Hardware.from_settings(settings)
    # The device's measured matmul peak (for MFU), kept between runs beside the embedded base cache.
    peak_cache = settings.embedded_cache_dir.parent / PEAK_FILE
    if settings.train_processes > 1:
        # torchrun starts the ranks; their progress lines come back into this run's logs.
        return train_distributed(
            base, hardware, parent.name, parent.adapter_dir, snapshot, config, output_dir,
            prompt_layout=parent.prompt_layout, processes=settings.train_processes, threads=threads, peak_cache=peak_cache,
        )  # fmt: skip
    return train_candidate_stage(
        base,
        hardware,
        parent.name,
        parent.adapter_dir,
        snapshot,
        config,
        output_dir,
        prompt_layout=parent.prompt_layout,
        progress=report,
        # The run's logs get a line per logging step (loss, tokens/s, ETA); a terminal bar would
        # interleave with them and never reach the Prefect UI.
        show_progress_bar=False,
        peak_cache=peak_cache,
    )
