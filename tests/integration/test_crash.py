"""kill -9 of a run at each stage, against the real Prefect harness, a real DuckDB file and a real tiny model.

Each case starts from the same state (v1 accepted, a second batch waiting), runs the flow in a child
process that SIGKILLs itself at one point, then checks the state from outside: the current version is
the old one or the new complete one, every listed version loads, no manifest claims a promotion the
pointer does not show, no feedback row is lost and the next run's new rows are exactly what they
were (or, after a completed promotion, what the new version did not learn). One case then runs the
next retrain to the end."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from incremental.config import GatePolicy, MetricRule, RunConfig, ScreeningPolicy, TrainSettings
from incremental.feedback import FeedbackStore
from incremental.layout import STAGING_DIR
from incremental.registry import Registry
from incremental.synthetic import synthetic_feedback

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
# The gate accepts whatever trains (margins far above any change): these tests are about what a crash
# leaves behind, and a crash while the pointer moves needs a candidate that is promoted.
FAST = RunConfig(
    train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=320),
    gate=GatePolicy(target_nll=MetricRule(margin=100.0), prompt_gain=MetricRule(margin=100.0, gated=False),
                    preference_margin=MetricRule(margin=100.0), min_eval_examples=1, generation_rows=2,
                    max_new_tokens=16, screening=ScreeningPolicy(enabled=False)),
)  # fmt: skip

# Runs the flow once and SIGKILLs itself at `point`: the fault is injected by replacing one function
# in this child process only; nothing in the product knows about it.
RUN_AND_DIE = """
import os, signal, sys
from incremental.config import RunConfig

point, config = sys.argv[1], RunConfig.model_validate_json(sys.argv[2])

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "training":
    import transformers
    original = transformers.Trainer.training_step
    steps = []
    def step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            die()
        return original(self, *args, **kwargs)
    transformers.Trainer.training_step = step
elif point == "evaluation":
    import incremental.evaluation
    incremental.evaluation.score_model = die
elif point == "before-pointer":
    from incremental.registry import Registry
    Registry._move_pointer = die
elif point == "pointer-write":
    import incremental.registry as registry
    def half_written(path, text):
        (path.parent / f".{path.name}.{os.getpid()}.tmp").write_text(text[: len(text) // 2])
        die()
    registry._write_atomic = half_written

from flows.retrain import retrain
summary = retrain(config=config)
if point != "none":
    raise SystemExit("the fault was never reached")
print(summary.headline(), flush=True)
"""

STAGES = ["training", "evaluation", "before-pointer", "pointer-write"]


@pytest.fixture(scope="module")
def after_v1(prefect_api, small_base, tmp_path_factory) -> Path:
    """A tree with v1 accepted and a second batch of feedback waiting: every case starts from a copy."""
    folder = tmp_path_factory.mktemp("after-v1")
    with pytest.MonkeyPatch.context() as env:
        _point_settings_at(env, folder, small_base)
        from flows.retrain import retrain

        store = FeedbackStore(folder / "feedback.duckdb")
        store.init()
        store.add_many(synthetic_feedback(40, 1, model="tiny"))
        first = retrain(config=FAST)
        assert first.status == "accepted", first.reasons
        store.add_many(synthetic_feedback(30, 2, model="tiny"))
    return folder


def _point_settings_at(env: pytest.MonkeyPatch, folder: Path, small_base: Path) -> dict[str, str]:
    values = {
        "INCREMENTAL_DB_PATH": str(folder / "feedback.duckdb"),
        "INCREMENTAL_MODELS_ROOT": str(folder / "finetuned_models"),
        "INCREMENTAL_BASE_MODEL": str(small_base),
        "INCREMENTAL_MODEL": "tiny",
        "INCREMENTAL_DEVICE": "cpu",
    }
    for key, value in values.items():
        env.setenv(key, value)
    return values


def _free_the_slot_of_a_killed_run(model: str) -> None:
    """The killed run still holds the model's retrain slot. A real server's lease repossessor frees it
    when the dead run's lease expires (flows/model_slot.py: 10 min); the test harness runs no
    repossessor, so the test frees it as that service would, or the next run waits for good."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from flows.model_slot import slot_name

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(slot_name(model)).active_slots == 1
        client.update_global_concurrency_limit(slot_name(model), GlobalConcurrencyLimitUpdate(active_slots=0))


def _feedback_rows(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT * FROM feedback ORDER BY id").fetchall()


@pytest.mark.parametrize("point", STAGES)
def test_kill_9_at_each_stage_leaves_a_consistent_state(point, after_v1, small_base, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path / "tree"
    shutil.copytree(after_v1, folder)
    environment = _point_settings_at(monkeypatch, folder, small_base)
    registry = Registry(folder / "finetuned_models", "tiny")
    store = FeedbackStore(folder / "feedback.duckdb")
    v1 = registry.current()
    rows_before = _feedback_rows(store.path)
    new_before = set(store.collect("tiny", registry.lineage(v1)).new.column("id").to_pylist())

    child = subprocess.run(
        [sys.executable, "-c", RUN_AND_DIE, point, FAST.model_dump_json()],
        env={**__import__("os").environ, **environment, "PREFECT_API_URL": PREFECT_API_URL.value()},
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-4000:]
    _free_the_slot_of_a_killed_run("tiny")

    # The pointer names the old version or a complete new one, and whatever is listed loads.
    current = registry.current()
    listed = {version.name: version for version in registry.versions()}
    assert current == v1 or current in listed
    for name in listed:
        registry.adapter_dir(name)
    # No manifest claims a promotion the pointer and the history do not show.
    promoted_in_history = {entry["to"] for entry in registry.history() if entry.get("action") == "promote"}
    for name, version in listed.items():
        if version.promotion_state == "promoted" and name != v1:
            assert name == current and name in promoted_in_history, f"{name} claims a promotion that did not happen"
        assert not version.problems, f"{name}: {version.problem}"
    # No feedback row lost or changed; the next run's new rows are what they were, unless the new
    # version became current (then exactly the rows it did not learn).
    assert _feedback_rows(store.path) == rows_before
    new_after = set(store.collect("tiny", registry.lineage(current)).new.column("id").to_pylist())
    if current == v1:
        assert new_after == new_before
    else:
        assert new_after == new_before - set(listed[current].manifest.data.new_ids)

    if point == "before-pointer":
        # The next run starts from whatever is current and finishes.
        from flows.retrain import retrain

        summary = retrain(config=FAST)
        assert summary.status in ("accepted", "rejected"), summary.reasons
        assert summary.parent == current
    leftovers = sorted(p.name for p in (folder / "finetuned_models" / "tiny" / STAGING_DIR).glob("*"))
    print(f"{point}: current {current}, versions {sorted(listed)}, staging leftovers {leftovers}")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found.extend(int(child) for child in children)
    return found


def _kill_and_check_gone(run: subprocess.Popen, pid: int, what: str) -> None:
    """SIGKILL the run, then `pid` must die with it (60 s: a hang guard, the watchdog is a process a
    busy machine can starve)."""
    import time

    run.kill()
    run.wait()
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"{what} (pid {pid}) outlived the killed run"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (a container's PID 1 may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog uses Linux's parent-death signal")
def test_a_killed_cli_run_takes_its_temporary_prefect_server_with_it(after_v1, small_base, tmp_path, monkeypatch):
    import os
    import time

    folder = tmp_path / "tree"
    shutil.copytree(after_v1, folder)
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    environment.update(_point_settings_at(monkeypatch, folder, small_base))
    run = subprocess.Popen(
        [sys.executable, "-c", "from cli.main import main; main()", "run"],
        env=environment, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, server = time.monotonic() + 120, None
        while server is None and time.monotonic() < deadline and run.poll() is None:
            for child in _children(run.pid):
                if "uvicorn" in Path(f"/proc/{child}/cmdline").read_text(errors="replace"):
                    server = child
            time.sleep(0.2)
        assert server is not None, "the run never started its temporary Prefect server"
        _kill_and_check_gone(run, server, "the temporary Prefect server")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


# A run's process: starts the watchdog, then a process carrying the owner mark that is not its child
# (started through a shell that exits at once), so the watchdog's poll of its children never sees it.
MARKED_ORPHAN = """
import os, subprocess, sys, time
from cli.prefect_api import OWNER_VARIABLE, _start_watchdog
watchdog = _start_watchdog()
environment = {**os.environ, OWNER_VARIABLE: str(os.getpid())}
shell = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], env=environment, capture_output=True, text=True)
print(shell.stdout.strip(), flush=True)
time.sleep(300)
"""


def test_a_killed_run_takes_the_processes_it_marked_even_unseen():
    import os

    run = subprocess.Popen([sys.executable, "-c", MARKED_ORPHAN], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(run.stdout.readline())
        assert orphan not in _children(run.pid) and _alive(orphan)
        _kill_and_check_gone(run, orphan, "the marked process")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if "orphan" in locals() and _alive(orphan):
            os.kill(orphan, 9)


def test_two_runs_started_together_on_one_model_train_it_once(after_v1, small_base, tmp_path, monkeypatch):
    """Two processes, one model: the model's retrain slot lets one train; the other waits for it and
    then finds nothing new. (Compare-and-swap, the last line of defence when runs do not share a
    Prefect server, is tested in tests/unit/test_registry.py.)"""
    import os

    from prefect.settings import PREFECT_API_URL

    folder = tmp_path / "tree"
    shutil.copytree(after_v1, folder)
    environment = {**os.environ, **_point_settings_at(monkeypatch, folder, small_base), "PREFECT_API_URL": PREFECT_API_URL.value()}
    registry = Registry(folder / "finetuned_models", "tiny")
    v1 = registry.current()
    rows_before = _feedback_rows(folder / "feedback.duckdb")
    runs = [
        subprocess.Popen([sys.executable, "-c", RUN_AND_DIE, "none", FAST.model_dump_json()], env=environment, cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, out[-2000:] + err[-4000:]
    children = [v for v in registry.versions() if v.manifest.parent == v1]
    assert len(children) == 1 and children[0].promotion_state == "promoted" and registry.current() == children[0].name
    headlines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert "accepted and promoted" in headlines[1] and headlines[0].startswith("Skipped: no new feedback"), headlines
    assert _feedback_rows(folder / "feedback.duckdb") == rows_before


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("while_writing", ["adapter", "manifest"])
def test_a_full_disk_while_writing_a_version_leaves_no_version_and_the_pointer_unchanged(
    while_writing, after_v1, small_base, tmp_path, monkeypatch
):
    import builtins

    from flows.retrain import retrain

    folder = tmp_path / "tree"
    shutil.copytree(after_v1, folder)
    _point_settings_at(monkeypatch, folder, small_base)
    registry = Registry(folder / "finetuned_models", "tiny")
    v1, rows_before = registry.current(), _feedback_rows(folder / "feedback.duckdb")
    names_before = [v.name for v in registry.versions()]
    if while_writing == "adapter":
        import peft.peft_model

        # The call peft's save_pretrained makes to write the weights file.
        monkeypatch.setattr(peft.peft_model, "safe_save_file", _disk_full)
    else:
        real_open = builtins.open

        def open_with_a_full_disk(file, mode="r", *args, **kwargs):
            if str(file).endswith("manifest.json") and "w" in mode and STAGING_DIR in str(file):
                handle = real_open(file, mode, *args, **kwargs)
                handle.write = _disk_full
                return handle
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_with_a_full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        retrain(config=FAST)
    monkeypatch.undo()
    _point_settings_at(monkeypatch, folder, small_base)
    assert registry.current() == v1
    assert [v.name for v in registry.versions()] == names_before  # nothing half-written is listed
    for version in registry.versions():
        assert not version.problems, version.problem
    assert _feedback_rows(folder / "feedback.duckdb") == rows_before
