"""The light commands (`status`, `versions`, `feedback held`) answer without the model or orchestration
stack: each runs in a fresh process, on a store with rows, a held row and two versions, and at exit
none of torch, transformers, peft or prefect has been imported. Their wall time is measured, not
asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import feedback_row, ids_in

from incremental.feedback import FeedbackStore
from incremental.registry import Registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "prefect")

# Runs the CLI as the `incremental` script does and, at exit, writes which heavy packages were imported.
WRAPPER = """
import atexit, json, os, sys
heavy = {heavy!r}
atexit.register(lambda: open(os.environ["MODULES_OUT"], "w").write(json.dumps(sorted(m for m in heavy if m in sys.modules))))
from cli.main import app
sys.argv = ["incremental", *sys.argv[1:]]
app()
"""


def registry_helpers():
    """`make_version` from the registry tests: a finalized version with a real manifest and adapter files."""
    spec = importlib.util.spec_from_file_location("registry_helpers", ROOT / "tests" / "unit" / "test_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def populated(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("light")
    store = FeedbackStore(folder / "feedback.duckdb")
    store.init()
    train = ids_in("train", 10)
    store.add_many([feedback_row(id=row_id, prompt=f"notes {row_id}") for row_id in train])
    assert store.mark("tiny", train[:1], "hold", reason="suspect", actor="test") == 1
    helpers = registry_helpers()
    registry = Registry(folder / "finetuned_models", "tiny")
    v1 = helpers.make_version(registry, None)
    helpers.make_version(registry, v1.name, status="rejected")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INCREMENTAL_")}
    environment.update(
        INCREMENTAL_DB_PATH=str(folder / "feedback.duckdb"),
        INCREMENTAL_MODELS_ROOT=str(folder / "finetuned_models"),
        INCREMENTAL_MODEL="tiny",
        PYTHONPATH=str(ROOT),
    )
    return environment


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["status"], "Incremental Mode"),
        (["versions"], "rejected"),
        (["feedback", "held"], "1 held row"),
    ],
)
def test_light_command_imports_no_model_or_orchestration_stack(populated, tmp_path, command, expected):
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER.format(heavy=HEAVY), *command],
        env={**populated, "MODULES_OUT": str(out), "COLUMNS": "200"},
        cwd=tmp_path,  # no .env from the repository
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # the output is shown when it fails
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout, done.stdout
    assert json.loads(out.read_text()) == [], f"`incremental {' '.join(command)}` imported heavy packages"
