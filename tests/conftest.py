"""Shared test setup: an isolated environment, one Prefect test harness per session (it takes
10-20 s to start), and small real models built in-process (no hub, no network).

Tiers: tests/unit (pure or real files, milliseconds to a second), tests/integration (real tiny
models that train, the Prefect harness, the CLI), tests/gpu (skipped without CUDA).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

# Set before anything imports Prefect or the HF stack: nothing may reach a network or a
# developer's real ~/.prefect database.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="incremental-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(_SESSION_HOME / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
        "DISABLE_SAFETENSORS_CONVERSION": "1",
    }
)
# A developer's .env or shell must not leak into tests; the test harness's own switches stay.
_HARNESS_VARIABLES = {"INCREMENTAL_REQUIRE_BROWSER", "INCREMENTAL_SCREENSHOTS_DIR"}
for key in [k for k in os.environ if k.startswith("INCREMENTAL_") and k not in _HARNESS_VARIABLES]:
    del os.environ[key]
os.environ["INCREMENTAL_EMBEDDED_CACHE_DIR"] = str(_SESSION_HOME / "embedded")


from incremental.config import GatePolicy, MetricRule, RunConfig, ScreeningPolicy, TrainSettings  # noqa: E402

# The smallest run that still trains, evaluates and gates: one epoch, short generations, and a
# margin wide enough that the tiny model's noise never decides (these tests are about what a run
# leaves behind or passes on, not about the gate's judgement: test_flow and the gate benchmark cover that).
QUICK_RUN = RunConfig(
    train=TrainSettings(epochs=1, batch_size=16, learning_rate=5e-3, max_length=256),
    gate=GatePolicy(
        target_nll=MetricRule(margin=1.0), preference_margin=MetricRule(margin=1.0),
        prompt_gain=MetricRule(margin=0.03, gated=False), min_eval_examples=1,
        generation_rows=2, max_new_tokens=16,
        screening=ScreeningPolicy(enabled=False),
    ),
)  # fmt: skip


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API (the test harness server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def small_base() -> Path:
    """A small embedded base (tokenizer + pretrained tiny Llama) built once per session, in seconds."""
    from incremental.embedded import ensure_embedded_base

    return ensure_embedded_base(_SESSION_HOME / "embedded-small", small_spec())


def small_spec():
    """Seconds to build; learns just enough to make training and gating observable."""
    from incremental.embedded import EmbeddedBaseSpec

    return EmbeddedBaseSpec(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        tokenizer_cases=300,
        pretrain_examples=600,
        pretrain_steps=60,
        warmup_steps=5,
        batch_size=16,
        eval_cases=8,
    )


@pytest.fixture
def env(tmp_path, small_base, monkeypatch):
    """Settings for one test: its own DuckDB file and version tree, the small base as a local model."""
    monkeypatch.setenv("INCREMENTAL_DB_PATH", str(tmp_path / "feedback.duckdb"))
    monkeypatch.setenv("INCREMENTAL_MODELS_ROOT", str(tmp_path / "finetuned_models"))
    monkeypatch.setenv("INCREMENTAL_BASE_MODEL", str(small_base))
    monkeypatch.setenv("INCREMENTAL_MODEL", "tiny")
    monkeypatch.setenv("INCREMENTAL_DEVICE", "cpu")
    from incremental.settings import Settings

    return Settings()


@pytest.fixture
def env_store(env):
    """The feedback store at the `env` fixture's DuckDB file (the one the flow and the CLI use), initialized."""
    from incremental.feedback import FeedbackStore

    created = FeedbackStore(env.db_path)
    created.init()
    return created


def case_table(n: int, seed: int):
    """Synthetic cases as the Arrow columns the dataset stage reads (id, artifact_type, prompt, target)."""
    import pyarrow as pa

    from incremental.synthetic import generate_cases

    cases = generate_cases(n, seed)
    columns = {
        "id": [f"{seed}-{i}" for i in range(n)],
        "artifact_type": [c.artifact_type for c in cases],
        "prompt": [c.notes for c in cases],
        "target": [c.artifact for c in cases],
    }
    return pa.table(columns, schema=pa.schema([(name, pa.string()) for name in columns]))



def eval_table(n: int, seed: int, trusted: bool = False):
    """Eval (or rejected-output) rows as the store's `collect` returns them: with the output a correction
    replaced (none here) and the trust flag."""
    import pyarrow as pa

    table = case_table(n, seed)
    return table.append_column("rejected_output", pa.nulls(n, pa.string())).append_column(
        "trusted", pa.array([trusted] * n, type=pa.bool_())
    )


def ids_in(split: str, count: int, prefix: str = "row") -> list[str]:
    """Ids that land in `split` at the default share, so tests control which side a row is on."""
    from incremental.feedback import split_for

    candidates = (f"{prefix}-{number}" for number in range(10_000))
    found = [candidate for candidate in candidates if split_for(candidate, 0.2) == split][:count]
    assert len(found) == count, f"split_for never gives {split!r}"
    return found


MISSING = object()  # a field left out of a feedback row


def feedback_row(**overrides: object) -> dict[str, object]:
    """One valid feedback row for model 'tiny'; override fields, or pass MISSING to leave one out."""
    fields: dict[str, object] = {
        "model": "tiny",
        "artifact_type": "erd",
        "prompt": "Customers place orders; an order has many items.",
        "output": "erDiagram CUSTOMER ||--o{ ORDER : places",
        "rating": "good",
    }
    fields.update(overrides)
    return {key: value for key, value in fields.items() if value is not MISSING}


@pytest.fixture
def store(tmp_path):
    """An initialized feedback store in its own DuckDB file (integration tests override it with the env's)."""
    from incremental.feedback import FeedbackStore

    created = FeedbackStore(tmp_path / "feedback.duckdb", lock_timeout_s=5.0)
    created.init()
    return created


# A process that opens the DuckDB file read-write (taking its lock) and keeps it for argv[2] seconds.
_LOCK_HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


@contextmanager
def held_by_another_process(path: Path, seconds: float) -> Iterator[subprocess.Popen]:
    """Another process holds the DuckDB file's lock while the block runs (or for `seconds`)."""
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def write_feedback_file(path: Path, rows: list[dict], *, ascii_json: bool = False) -> Path:
    """The rows as JSONL, CSV or Parquet by the path's suffix, written as users' tools would write them.

    A missing key is an empty CSV cell or a Parquet null; Parquet column types are inferred (a
    column of nulls only is text).
    """
    import csv
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(name for row in rows for name in row))
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=ascii_json) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)
    else:
        columns = {name: pa.array([row.get(name) for row in rows]) for name in names}
        pq.write_table(pa.table({name: a.cast(pa.string()) if pa.types.is_null(a.type) else a for name, a in columns.items()}), path)
    return path


def finalize_version(registry, base_id: str, write: Callable[[Path], None]) -> str:
    """A promoted version of `registry` (its parent: the current one) whose staging folder `write` fills,
    with a minimal accepted manifest; returns its name."""
    from incremental.manifest import BaseModelRef, DataRecord, GateRecord, Manifest, TrainingRecord

    parent = registry.current()
    reservation = registry.reserve(parent)
    write(reservation.staging_dir)
    manifest = Manifest(
        name=reservation.name, model=registry.model, parent=parent, status="accepted",
        created_at=datetime.now(UTC), base_model=BaseModelRef(id=base_id), run_config={}, libraries={},
        data=DataRecord(dataset_hash="a" * 64, eval_snapshot_hash="b" * 64, new_ids=(), replay_ids=(), eval_ids=(), n_train_examples=0),
        training=TrainingRecord(mode="base", device="cpu", quantization="none", steps=1, epochs=1.0, train_loss=1.0,
                                trainable_parameters=1, target_tokens=1, wall_seconds=0.1),
        scores={"candidate": {}, "parent": {}}, gate=GateRecord(verdict="accept", reasons=("test",), policy={}),
    )  # fmt: skip
    result = registry.finalize(reservation, manifest)
    assert result.promoted
    return result.name
