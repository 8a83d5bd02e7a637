"""The thread count: the cores a process may use (affinity capped by the cgroup quota), the setting
that overrides it, and torch's count after `apply_threads` (in a subprocess: torch's thread state is
per process and cannot be undone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from incremental.settings import Settings
from incremental.threads import available_cores, cgroup_cpu_limit, own_cpu_max

ROOT = Path(__file__).resolve().parents[2]


def cpu_max(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000\n", None),
        ("150000 100000\n", 1.5),
        ("200000 100000\n", 2.0),
        ("50000 100000\n", 0.5),
        ("", None),
        ("garbage\n", None),
        ("100000 0\n", None),
    ],
)
def test_cgroup_quota_is_read_in_cores(tmp_path, text, cores):
    assert cgroup_cpu_limit(cpu_max(tmp_path, text)) == cores


def test_a_missing_cpu_max_means_no_quota(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "absent" / "cpu.max") is None


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000", 8),  # no quota: the affinity
        ("400000 100000", 4),  # a quota below the affinity caps it
        ("150000 100000", 1),  # rounded down: 2 threads on 1.5 cores would be throttled
        ("50000 100000", 1),  # never below one
        ("1600000 100000", 8),  # a quota above the affinity does not add cores
    ],
)
def test_default_is_the_affinity_capped_by_the_quota(tmp_path, monkeypatch, text, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert available_cores(cpu_max(tmp_path, text)) == cores


def test_without_affinity_the_machine_count_is_used(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert available_cores(tmp_path / "none") == 3


def test_the_process_own_cgroup_file_is_found(tmp_path):
    (tmp_path / "cg" / "job.slice").mkdir(parents=True)
    own = cpu_max(tmp_path / "cg" / "job.slice", "100000 100000")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job.slice\n")
    assert own_cpu_max(proc, tmp_path / "cg") == own
    proc.write_text("0::/elsewhere\n")  # a cgroup not mounted here: the root file
    assert own_cpu_max(proc, tmp_path / "cg") == tmp_path / "cg" / "cpu.max"
    assert own_cpu_max(tmp_path / "no-proc", tmp_path / "cg") == tmp_path / "cg" / "cpu.max"


def test_the_setting_is_read_from_the_environment_and_validated(monkeypatch):
    assert Settings().threads is None
    monkeypatch.setenv("INCREMENTAL_THREADS", "3")
    assert Settings().threads == 3
    monkeypatch.setenv("INCREMENTAL_THREADS", "0")
    with pytest.raises(ValidationError, match="threads"):
        Settings()


def test_counting_cores_imports_no_torch():
    script = "import sys; import incremental.threads as t; t.available_cores(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


APPLY = """
import json, logging, sys, threading
import torch
from incremental.settings import Settings
from incremental.threads import apply_threads, available_cores

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
torch.ones(64, 64) @ torch.ones(64, 64)  # parallel work first: the interop count is fixed from here on
applied = [apply_threads(Settings()), apply_threads(Settings())]  # twice: no error, one log line
seen = {}
worker = threading.Thread(target=lambda: seen.update(other=torch.get_num_threads()))
worker.start(); worker.join()
print(json.dumps({"applied": applied, "main": torch.get_num_threads(), "other_thread": seen["other"], "cores": available_cores()}))
"""


def run_apply(threads_env: str | None) -> tuple[dict, str]:
    environment = {k: v for k, v in os.environ.items() if k != "INCREMENTAL_THREADS"}
    environment["PYTHONPATH"] = str(ROOT)
    if threads_env is not None:
        environment["INCREMENTAL_THREADS"] = threads_env
    done = subprocess.run([sys.executable, "-c", APPLY], env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("setting", ["1", "3"])
def test_torch_uses_the_threads_the_setting_names(setting):
    result, log = run_apply(setting)
    n = int(setting)
    assert result["applied"] == [n, n]
    assert result["main"] == n and result["other_thread"] == n  # a thread started later inherits it
    assert log.count("[INCREMENTAL] Using") == 1
    assert f"Using {n} threads (INCREMENTAL_THREADS={setting}, cores available to this process: {result['cores']})" in log


def test_torch_uses_the_available_cores_by_default():
    result, log = run_apply(None)
    assert result["applied"] == [result["cores"]] * 2 and result["main"] == result["cores"]
    assert "INCREMENTAL_THREADS=unset" in log

