"""The real thing, once per session: a `prefect server start` process (UI, API, scheduler), and
`incremental serve --model tiny` against it, started from a folder that is not the project.

Tests talk to the server over its REST API, as the UI does; the `PrefectServer` object carries
the few calls they share. Everything runs in subprocesses with their own PREFECT_HOME, a temporary
DuckDB file, a temporary models root and the session's small base model, and is stopped (process
group: terminate, then kill) when the session ends.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# The machine is shared and busy: a fresh server migrates its database first, a run imports torch.
SERVER_START_S = 180
SERVE_START_S = 180
RUN_DONE_S = 600
# One epoch, short generations, and a gate that accepts whatever trains (margins far above any
# change): these tests are about orchestration, so a run that trains is accepted, every time.
FAST_CONFIG: dict[str, Any] = {
    "train": {"epochs": 1, "batch_size": 16, "learning_rate": 5e-3, "max_length": 320},
    "gate": {
        "target_nll": {"margin": 100.0},
        "prompt_gain": {"margin": 100.0, "gated": False},
        "preference_margin": {"margin": 100.0},
        "min_eval_examples": 1,
        "generation_rows": 2,
        "max_new_tokens": 16,
        "screening": {"enabled": False},
    },
}


def free_port() -> int:
    """A port that is free now, below Linux's range for outgoing connections (32768-60999), where any
    process's next connection could take it before the server binds it."""
    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def tail(path: Path, lines: int = 60) -> str:
    """The last lines of a log file, for assertion messages."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} was never written)"


def start_group(command: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A subprocess in its own process group (so stopping it stops its children), output to `log`."""
    with log.open("ab") as handle:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group, SIGKILL to what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children of the group may outlive its leader: kill what remains of the group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class PrefectServer:
    """A running `prefect server start` and the environment its clients need."""

    url: str
    api_url: str
    env: dict[str, str]
    root: Path
    log: Path
    http: httpx.Client = field(repr=False)

    @property
    def db_path(self) -> Path:
        return Path(self.env["INCREMENTAL_DB_PATH"])

    @property
    def models_root(self) -> Path:
        return Path(self.env["INCREMENTAL_MODELS_ROOT"])

    # -- REST --------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """One API call, retried while the server answers 503: on SQLite under load it does so for a
        locked database, and expects clients to retry (Prefect's own client does)."""
        for attempt in range(12):
            response = self.http.request(method, f"{self.api_url}{path}", json=body)
            if response.status_code != 503:
                return response
            time.sleep(min(0.25 * 2**attempt, 5.0))
        return response

    def get(self, path: str) -> Any:
        response = self.request("GET", path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None) -> Any:
        response = self.request("POST", path, body or {})
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment(self, name: str) -> dict:
        """`flow/deployment` as the API returns it."""
        return self.get(f"/deployments/name/{name}")

    def create_run(self, deployment: str, parameters: dict | None = None) -> dict:
        """A flow run of `deployment` created the way the UI's Run button does (edited parameters)."""
        deployment_id = self.deployment(deployment)["id"]
        return self.post(f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters or {}})

    def run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def wait(self, run_id: str, timeout_s: float = RUN_DONE_S, *, logs: Path | None = None) -> dict:
        """Poll a flow run until it is in a terminal state; the run as the API returns it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["state"] and run["state"]["type"] in TERMINAL:
                return run
            time.sleep(1.0)
        raise AssertionError(
            f"flow run {run_id} not finished after {timeout_s:.0f} s: state {run['state']}\n"
            f"run logs:\n{self.log_text(run_id)}" + (f"\n--- {logs.name}:\n{tail(logs)}" if logs else "")
        )

    def states(self, run_id: str) -> list[tuple[str, str]]:
        """(type, name) of every state the run has been in, oldest first."""
        states = self.get(f"/flow_run_states/?flow_run_id={run_id}")
        return [(s["type"], s["name"]) for s in sorted(states, key=lambda s: s["timestamp"])]

    def artifacts(self, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def log_text(self, run_id: str, *expected: str, timeout_s: float = 60.0) -> str:
        """The run's log lines. A run's process ships its last lines after its final state is set, so
        this polls until every `expected` text is there (or `timeout_s` passed: the caller's assert says)."""
        deadline = time.monotonic() + timeout_s
        while True:
            logs = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"})
            text = "\n".join(f"{entry['level']:>2} {entry['message']}" for entry in logs)
            if all(needle in text for needle in expected) or time.monotonic() > deadline:
                return text
            time.sleep(0.5)

    def flow_runs(self, flow_name: str, *, since: datetime | None = None) -> list[dict]:
        """Runs of the flow `flow_name` created at or after `since` (server and tests share a clock), oldest
        first; not the ones the scheduler creates ahead for the nightly schedule."""
        runs = self.post("/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "limit": 200})
        runs = [r for r in runs if not r["auto_scheduled"] and (since is None or datetime.fromisoformat(r["created"]) >= since)]
        return sorted(runs, key=lambda r: r["created"])

    @staticmethod
    def now() -> datetime:
        return datetime.now(timezone.utc)

    @contextmanager
    def hold_slot(self, model: str, lease_s: int = 600) -> Iterator[None]:
        """Take the model's retrain slot (limit `retrain-<model>`, created if missing) as a run would."""
        name = f"retrain-{model}"
        if self.request("GET", f"/v2/concurrency_limits/{name}").status_code == 404:
            self.post("/v2/concurrency_limits/", {"name": name, "limit": 1})
        lease = self.post(
            "/v2/concurrency_limits/increment-with-lease",
            {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": lease_s},
        )
        try:
            yield
        finally:
            self.post("/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease["lease_id"]})

    # -- subprocesses with this server's environment ----------------------------------------

    def spawn(self, *command: str, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A project command (`incremental ...`, `prefect ...` from this venv) in its own process group."""
        return start_group([str(BIN / command[0]), *command[1:]], env={**self.env, **(env or {})}, cwd=cwd, log=log)

    stop = staticmethod(stop_group)
    tail = staticmethod(tail)

    # -- the project's side ------------------------------------------------------------------

    def add_feedback(self, n: int, seed: int, model: str = "tiny") -> list[str]:
        """`n` synthetic feedback rows for `model` in the served DuckDB file."""
        from incremental.feedback import FeedbackStore
        from incremental.synthetic import synthetic_feedback

        store = FeedbackStore(self.db_path, lock_timeout_s=60)
        store.init()
        return store.add_many(synthetic_feedback(n, seed, model=model))

    def versions(self, model: str = "tiny") -> list[str]:
        from incremental.registry import Registry

        return [v.name for v in Registry(self.models_root, model).versions()]

    def current(self, model: str = "tiny") -> str | None:
        from incremental.registry import Registry

        return Registry(self.models_root, model).current()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, request) -> Iterator[PrefectServer]:
    """`prefect server start` on a free port with its own PREFECT_HOME and filesystem leases."""
    root = tmp_path_factory.mktemp("prefect-server")
    http = httpx.Client(timeout=30.0)
    process = None
    try:
        small_base = None
        # Another process may take the port while the server starts (it imports for seconds): try another.
        for attempt in range(3):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = root / f"server-{attempt}.log"
            process = _start_server(root, url, log)
            if small_base is None:
                small_base = request.getfixturevalue("small_base")  # built while the server migrates its database
            if _healthy(process, http, url, log):
                break
        else:
            raise AssertionError(f"prefect server did not start on three ports:\n{tail(log)}")
        client_env = {
            **os.environ,
            "PREFECT_HOME": str(root / "client-home"),
            "PREFECT_API_URL": f"{url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # serve and workers look for runs every 2 s instead of 10-15 s.
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "INCREMENTAL_DB_PATH": str(root / "feedback.duckdb"),
            "INCREMENTAL_MODELS_ROOT": str(root / "finetuned_models"),
            "INCREMENTAL_BASE_MODEL": str(small_base),
            "INCREMENTAL_MODEL": "tiny",
            "INCREMENTAL_DEVICE": "cpu",
            "TOKENIZERS_PARALLELISM": "false",
        }
        yield PrefectServer(url=url, api_url=f"{url}/api", env=client_env, root=root, log=log, http=http)
    finally:
        http.close()
        if process is not None:
            stop_group(process)


def _start_server(root: Path, url: str, log: Path) -> subprocess.Popen:
    port = url.rsplit(":", 1)[1]
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "server-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"{url}/api",
        # Leases survive a server restart (in memory they would not, and a training would cancel itself).
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        # A 503 (SQLite locked under load) is logged with its cause instead of passing silently.
        "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",
    }
    env.pop("PREFECT_API_URL", None)
    return start_group([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port], env=env, cwd=root, log=log)


def _healthy(process: subprocess.Popen, http: httpx.Client, url: str, log: Path) -> bool:
    """Wait for /api/health; False if the server exited because its port was taken."""
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if process.poll() is not None:
            if "already in use" in tail(log):
                return False
            raise AssertionError(f"prefect server exited with {process.returncode}:\n{tail(log)}")
        try:
            if http.get(f"{url}/api/health").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"prefect server not healthy after {SERVER_START_S} s:\n{tail(log)}"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def served(prefect_server: PrefectServer, tmp_path_factory) -> Iterator[Path]:
    """`incremental serve --model tiny` against the server, from a folder that is not the project
    (entry points must not depend on it); yields serve's log file."""
    cwd = tmp_path_factory.mktemp("serve-cwd")
    log = cwd / "serve.log"
    process = start_group([str(BIN / "incremental"), "serve", "--model", "tiny"], env=prefect_server.env, cwd=cwd, log=log)
    try:
        deadline = time.monotonic() + SERVE_START_S
        wanted = ("retrain/nightly-tiny", "retrain/manual-tiny", "watch-feedback/watch-tiny")
        while True:
            assert process.poll() is None, f"incremental serve exited with {process.returncode}:\n{tail(log)}"
            found = [name for name in wanted if _exists(prefect_server, f"/deployments/name/{name}")]
            if len(found) == len(wanted) and "Your deployments are being served" in log.read_text(errors="replace"):
                break
            assert time.monotonic() < deadline, f"serve registered only {found} after {SERVE_START_S} s:\n{tail(log)}"
            time.sleep(1.0)
        # The watcher's own schedule (every 15 min) is switched off: a run of it in the middle of a test
        # could start a retrain the test did not ask for. Tests start the watcher themselves.
        watch = prefect_server.deployment("watch-feedback/watch-tiny")
        for schedule in watch["schedules"]:
            response = prefect_server.request(
                "PATCH", f"/deployments/{watch['id']}/schedules/{schedule['id']}", {"active": False}
            )
            assert response.status_code == 204, response.text
        yield log
    finally:
        stop_group(process)


def _exists(server: PrefectServer, path: str) -> bool:
    return server.request("GET", path).status_code == 200


@pytest.fixture
def fast_config() -> dict[str, Any]:
    """FAST_CONFIG as JSON parameters (a fresh copy to edit)."""
    return json.loads(json.dumps(FAST_CONFIG))


# -- the browser (tests/server/test_browser.py, test_report_browser.py) --------------------------

CHROMIUM = Path("/usr/bin/chromium")
# Headless on a machine with no screen, no GPU and a closed network: without the background
# flags Chromium keeps trying Google's hosts.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# The machine is shared and slow; the UI is a single-page app that loads its data after the page.
UI_TIMEOUT_MS = 120_000
VIEWPORT = {"width": 1400, "height": 1000}
TALLEST_SHOT_PX = 12_000


def browser_required() -> bool:
    """In CI a missing browser is a failure, not a skip."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("INCREMENTAL_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium under Playwright, once per test module: Playwright's sync API runs an asyncio
    loop in the main thread while it is open, and a second one cannot start inside it (nor should
    in-process Prefect calls of later modules run beside it). Listed first in a test's arguments, so
    a machine without it skips before the Prefect server starts."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} not found: install Debian's `chromium` package (`make browser`, as root)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "the `playwright` package is not installed: pip install -e '.[dev]'"
    if missing:
        if browser_required():
            pytest.fail(f"browser tests must run in CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=UI_TIMEOUT_MS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium) -> Iterator:
    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def shoot(page, tmp_path, request):
    """shoot(name): a full-page screenshot `<test>-<name>.png` in tmp_path (and $INCREMENTAL_SCREENSHOTS_DIR)."""
    extra = os.environ.get("INCREMENTAL_SCREENSHOTS_DIR")

    def shoot(name: str) -> Path:
        # The UI scrolls inside a container, not the document, so a "full page" capture would stop at
        # the window: grow the window to the tallest scrolled content first.
        height = page.evaluate(
            """() => Math.max(document.documentElement.scrollHeight,
                 ...Array.from(document.querySelectorAll('*'), e => {
                     const overflow = getComputedStyle(e).overflowY;
                     return (overflow === 'auto' || overflow === 'scroll') ? e.scrollHeight : 0; }))"""
        )
        page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], min(height, TALLEST_SHOT_PX))})
        page.wait_for_timeout(300)  # let the layout settle at the new size
        path = tmp_path / f"{request.node.name}-{name}.png"
        page.screenshot(path=path, full_page=True)
        page.set_viewport_size(VIEWPORT)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(extra) / path.name)
        return path

    return shoot
