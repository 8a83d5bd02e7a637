"""How many CPU threads torch uses: the `threads` setting, or the cores this process may use.

torch's default follows the CPU affinity (through OpenMP) but not a cgroup CPU quota: in a container
limited to 2 CPUs on a 16-core host it starts 16 threads, more than the scheduler runs at once, and
every step waits on descheduled threads (BENCHMARKS.md, threads). The cores a process may use are its
CPU affinity capped by its cgroup's quota. Counting them reads two small files and imports nothing
heavy; `apply_threads` imports torch. It knows nothing of models or training.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from incremental.settings import Settings

__all__ = ["apply_threads", "available_cores", "cgroup_cpu_limit", "own_cpu_max"]

log = logging.getLogger("incremental")

CGROUP_ROOT = Path("/sys/fs/cgroup")

_logged: int | None = None  # the thread count last logged: one line per process unless it changes


def own_cpu_max(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> Path:
    """This process's cgroup v2 `cpu.max`: `<root>/<path from the '0::' line>/cpu.max`, or `<root>/cpu.max`
    when that is unknown (a container with its own cgroup namespace sees its own cgroup at the root)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                own = root / line[3:].strip().lstrip("/") / "cpu.max"
                if own.exists():
                    return own
    except OSError:
        pass  # no /proc (not Linux) or not readable: fall back to the root file
    return root / "cpu.max"


def cgroup_cpu_limit(cpu_max: Path) -> float | None:
    """The CPU quota in cores from a cgroup v2 `cpu.max` file ("<quota> <period>", e.g. "150000 100000"
    is 1.5 cores); None when unlimited ("max ...") or when the file is missing or unreadable."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        cores = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return cores if cores > 0 else None


def available_cores(cpu_max: Path | None = None) -> int:
    """The cores this process may use: its CPU affinity (or the machine's count where affinity is not
    available), capped by the cgroup quota rounded down (at least 1), so threads never outnumber what
    the scheduler will run at once. `cpu_max` defaults to this process's own cgroup file."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(own_cpu_max() if cpu_max is None else cpu_max)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def apply_threads(settings: Settings) -> int:
    """Set torch's intra-op threads to `settings.threads` (default: `available_cores()`); returns the count.

    Call it in the thread that runs the model, before the model runs: torch keeps the count per thread
    once a thread has done parallel work (its OpenMP setting), so the flow's tasks each call it, and a
    library user calls it before `train_candidate`, `evaluate_candidate` or scoring. Inter-op threads
    are set too where torch still allows it (only before any parallel work in the process).
    """
    global _logged
    import torch  # deferred: counting cores must stay light

    cores = available_cores()
    threads = settings.threads if settings.threads is not None else cores
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already set, or parallel work has started: torch allows it once per process, and intra-op is what matters here
    if _logged != threads:
        _logged = threads
        setting = "unset" if settings.threads is None else str(settings.threads)
        log.info("[INCREMENTAL] Using %d threads (INCREMENTAL_THREADS=%s, cores available to this process: %d)", threads, setting, cores)
    return threads
