"""The Prefect API a CLI run reports to: the configured server, or a temporary one that dies with the run.

Without `PREFECT_API_URL`, Prefect starts a temporary server in a child process on first use and
stops it at exit; a run killed with SIGKILL never reaches that exit, and the server lived on. Here
the temporary server is started explicitly, beside a small watchdog process that notes this process's
children and stops them when the kernel tells it this process died (Linux `PR_SET_PDEATHSIG`). Elsewhere the watchdog is skipped
and Prefect's own stop at exit is all there is.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Asks the kernel for SIGTERM when its parent dies; meanwhile notes the parent's child processes
# every quarter second, and on the signal stops them and every process marked with the parent's pid
# in OWNER_VARIABLE (SIGTERM, then SIGKILL after 5 s).
OWNER_VARIABLE = "INCREMENTAL_TEMPORARY_SERVER_OF"
_WATCHDOG = """
import ctypes, os, signal, sys, time
from pathlib import Path
parent, me, seen = int(sys.argv[1]), os.getpid(), set()
OWNER_VARIABLE = sys.argv[2]

def note_children():
    for task in Path(f"/proc/{parent}/task").glob("*"):
        try:
            seen.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            pass
    seen.discard(me)

def marked_processes():
    # The server's processes carry the owner mark in their environment: found even when the parent
    # died before the poll below ever saw them (a busy machine can starve this process for seconds).
    mark = f"{OWNER_VARIABLE}={parent}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                if mark in (entry / "environ").read_bytes().split(b"\\0"):
                    yield int(entry.name)
            except OSError:
                pass

def stop_children(*_):
    seen.update(marked_processes())
    for pid in seen:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while seen and time.monotonic() < deadline:
        time.sleep(0.1)
        for pid in list(seen):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                seen.discard(pid)
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)

signal.signal(signal.SIGTERM, stop_children)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
while True:
    if os.getppid() != parent:  # the parent died before prctl took effect
        stop_children()
    note_children()
    time.sleep(0.25)
"""


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yields the API URL runs report to while the block runs; a temporary server is stopped after it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    # Started first: the server takes seconds to answer, and a kill meanwhile must take it too.
    watchdog = _start_watchdog()
    server = SubprocessASGIServer()
    import os

    os.environ[OWNER_VARIABLE] = str(os.getpid())  # inherited by the server's processes: the watchdog finds them by it
    try:
        server.start()
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop(OWNER_VARIABLE, None)
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        server.stop()


def _start_watchdog() -> subprocess.Popen | None:
    if not sys.platform.startswith("linux"):
        return None
    import os

    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), OWNER_VARIABLE],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C on the terminal reaches the run, not the watchdog
    )  # fmt: skip
