"""Every rough input the CLI meets, as a real process: exit code 2, one `error:` line that names the
field or file and the fix, no traceback, and the feedback database exactly as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from incremental.feedback import FeedbackStore
from incremental.feedback.ingest import MAX_FIELD_BYTES

from conftest import feedback_row, ids_in

pytestmark = pytest.mark.integration


def run_cli(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "INCREMENTAL_DB_PATH": str(tmp_path / "feedback.duckdb"),
        "INCREMENTAL_MODELS_ROOT": str(tmp_path / "models"),
        "INCREMENTAL_MODEL": "tiny",
        **settings,
    }
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip


def assert_one_line(done: subprocess.CompletedProcess, *named: str) -> str:
    """Exit code 2, no traceback, and stdout is one `error:` line naming each of `named`."""
    everything = done.stdout + done.stderr
    assert done.returncode == 2, everything
    assert "Traceback" not in everything, everything
    lines = done.stdout.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), everything
    for name in named:
        assert name in lines[0], everything
    return lines[0]


def snapshot(path: Path) -> tuple[list[tuple], list[tuple]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT * FROM feedback ORDER BY id").fetchall()
        marks = con.execute("SELECT * FROM row_marks ORDER BY seq").fetchall()
    finally:
        con.close()
    return rows, marks


@pytest.fixture
def seeded(tmp_path: Path):
    """A feedback database with a few rows and a hold; yields it, then checks it is unchanged."""
    store = FeedbackStore(tmp_path / "feedback.duckdb")
    store.init()
    ids = store.add_many([feedback_row(id=f"seed-{n}", prompt=f"notes [/x] {n}") for n in range(3)])
    store.mark("tiny", ids[:1], "hold", reason="checking", actor="test")
    before = snapshot(store.path)
    yield tmp_path
    assert snapshot(store.path) == before


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- hostile feedback ---------------------------------------------------------------------------


def test_a_lone_surrogate_escape_is_refused_naming_the_line(seeded: Path) -> None:
    path = jsonl(seeded / "bad.jsonl", json.dumps(feedback_row(prompt="@@")).replace("@@", "a\\ud800b"))
    assert_one_line(run_cli(seeded, "feedback", "import", str(path)), f"{path}:1: not valid JSON", "lone surrogate", "remove it")


def test_a_created_at_far_in_the_future_is_refused_naming_the_field(seeded: Path) -> None:
    path = jsonl(seeded / "late.jsonl", json.dumps(feedback_row(created_at="2999-01-01T00:00:00Z")))
    assert_one_line(run_cli(seeded, "feedback", "import", str(path)), f"{path}:1: field 'created_at'", "1 day ahead", "2999-01-01")


def test_a_field_over_the_size_limit_is_refused_naming_it_and_the_limit(seeded: Path) -> None:
    path = jsonl(seeded / "big.jsonl", json.dumps(feedback_row(output="x" * (MAX_FIELD_BYTES + 1))))
    assert_one_line(run_cli(seeded, "feedback", "import", str(path)), f"{path}:1: field 'output'", "over the limit of 16 MiB")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"notes \xff\xfe", "not UTF-8 text (byte 0xff at offset 6); save the file as UTF-8", id="invalid-utf8"),
        pytest.param(b"a \xed\xa0\x80 b", "not UTF-8 text (byte 0xed at offset 2)", id="encoded-surrogate"),
        pytest.param(None, "over the limit of 16 MiB per text field", id="over-the-limit"),
    ],
)
def test_feedback_add_refuses_a_notes_file_it_cannot_store(seeded: Path, content: bytes | None, expected: str) -> None:
    notes = seeded / "notes [x] [bold].txt"
    if content is None:
        with notes.open("wb") as handle:  # sparse: the size is checked before anything is read
            handle.truncate(MAX_FIELD_BYTES + 1)
    else:
        notes.write_bytes(content)
    (seeded / "out.md").write_text("erDiagram")
    done = run_cli(seeded, "feedback", "add", "-t", "erd", "--rating", "good", "--notes", str(notes), "--output", str(seeded / "out.md"))
    assert_one_line(done, f"--notes {notes}: ", expected)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["feedback", "import", "{tmp}/nope[/x].jsonl"], ["{tmp}/nope[/x].jsonl: no such file"], id="import-missing-bracket-path"),
        pytest.param(["feedback", "import", "{tmp}"], [": unsupported file type"], id="import-a-folder"),
        pytest.param(["feedback", "import", "{tmp}/dir.jsonl"], ["{tmp}/dir.jsonl: is a folder"], id="import-a-folder-named-jsonl"),
        pytest.param(["status", "--model", "Bad[/x]"], ["--model 'Bad[/x]': not a model name"], id="bad-model"),
        pytest.param(["feedback", "release", "--ids", "seed-0", "--reason", ""], ["needs a reason (--reason)"], id="empty-reason"),
        pytest.param(["feedback", "release"], ["give --ids a,b,c, or pick held rows with --version"], id="release-nothing"),
        pytest.param(["feedback", "release", "--ids", "[/x]"], ["'[/x]'", "check the ids"], id="release-unknown-id"),
        pytest.param(["rollback", "[/x]"], ["'[/x]' is not a finished version of 'tiny'"], id="rollback-unknown"),
        pytest.param(["versions", "--explain", "[bold]v9"], ["'[bold]v9' is not a finished version"], id="explain-unknown"),
        pytest.param(["dataset", "rebuild", "v1_20250101_000000"], ["'v1_20250101_000000' is not a finished version"], id="rebuild-unknown"),
        pytest.param(["feedback", "export", "{tmp}/feedback.duckdb/x.jsonl"], ["{tmp}/feedback.duckdb/x.jsonl: cannot write it"], id="export-under-a-file"),
        pytest.param(["feedback", "export", "{tmp}/x.csv"], ["cannot export to '.csv'"], id="export-csv"),
    ],
)
def test_bad_arguments_are_one_line(seeded: Path, args: list[str], named: list[str]) -> None:
    (seeded / "dir.jsonl").mkdir()
    done = run_cli(seeded, *(arg.format(tmp=seeded) for arg in args))
    assert_one_line(done, *(name.format(tmp=seeded) for name in named))


# Every command that takes --model, with the other arguments it needs to get that far.
MODEL_COMMANDS = [
    ["status"], ["status", "--json"], ["versions"], ["versions", "--json"], ["doctor"], ["rollback", "base"], ["run"], ["runs"],
    ["serve"], ["feedback", "add", "-t", "erd", "--rating", "good", "--notes", "{tmp}/n.txt", "--output", "{tmp}/n.txt"],
    ["feedback", "import", "{tmp}/none.jsonl"], ["feedback", "export", "{tmp}/out.jsonl"], ["feedback", "held"],
    ["feedback", "release", "--ids", "seed-0"], ["feedback", "exclude", "--ids", "seed-0"], ["feedback", "include", "--ids", "seed-0"],
    ["dataset", "preview"], ["dataset", "preview", "--json"], ["dataset", "rebuild", "v1_20250101_000000"], ["gate", "calibrate"],
]  # fmt: skip


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=[" ".join(command) for command in MODEL_COMMANDS])
def test_a_model_name_that_is_a_path_is_refused_by_every_command(seeded: Path, command: list[str]) -> None:
    (seeded / "n.txt").write_text("notes")
    args = [arg.format(tmp=seeded) for arg in command]
    assert_one_line(run_cli(seeded, *args, "--model", "../x", PREFECT_API_URL="http://127.0.0.1:9/api"), "--model '../x': not a model name")
    assert not (seeded / "out.jsonl").exists()


def run_cli_without_a_prefect_api(seeded: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a process with no PREFECT_API_URL (the test session's harness sets one)."""
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True, text=True, timeout=120, env={**environment, "INCREMENTAL_DB_PATH": str(seeded / "feedback.duckdb")},
    )  # fmt: skip


def test_runs_without_a_prefect_api_says_how_to_get_one(seeded: Path) -> None:
    assert_one_line(run_cli_without_a_prefect_api(seeded, "runs"), "PREFECT_API_URL is not set", "prefect server start")


def test_serve_without_a_prefect_server_says_how_to_get_one(seeded: Path) -> None:
    """A temporary server would take the deployments and never fire a schedule: refused, one line."""
    done = run_cli_without_a_prefect_api(seeded, "serve")
    assert_one_line(done, "serve needs a Prefect server", "prefect server start", "PREFECT_API_URL")


def test_serve_refuses_an_unknown_time_zone(seeded: Path) -> None:
    done = run_cli(seeded, "serve", "--timezone", "Mars/Base", PREFECT_API_URL="http://127.0.0.1:9/api")
    assert_one_line(done, "--timezone 'Mars/Base': not a time zone", "Europe/Berlin")


def test_runs_with_an_unreachable_prefect_api_names_it(seeded: Path) -> None:
    done = run_cli(seeded, "runs", "--json", PREFECT_API_URL="http://127.0.0.1:9/api")
    assert_one_line(done, "PREFECT_API_URL=http://127.0.0.1:9/api: cannot read the runs", "prefect server start")


# -- a broken --config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("{not json", ["Invalid JSON", "write one JSON object of run config fields"], id="bad-json"),
        pytest.param('{"trian": {}}', ["field 'trian': Extra inputs are not permitted; remove it or fix its spelling"], id="unknown-field"),
        pytest.param('{"train": {"learning_rate": "fast"}}', ["field 'train.learning_rate'", "(got 'fast')", "fix the value"], id="wrong-type"),
        pytest.param('{"train": {"learning_rate": 1e-4, "epochs": "many"}, "gate": []}', ["(and 1 more problem(s))"], id="several"),
        pytest.param(b"{\xff}", ["not UTF-8 text"], id="not-utf8"),
        pytest.param(None, ["cannot read it (No such file or directory)"], id="missing"),
    ],
)
@pytest.mark.parametrize("command", [["gate", "calibrate"], ["run"]], ids=["calibrate", "run"])
def test_a_broken_config_names_the_file_and_the_field(seeded: Path, command: list[str], text: str | bytes | None, named: list[str]) -> None:
    path = seeded / "run [x].json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    assert_one_line(run_cli(seeded, *command, "--config", str(path)), f"--config {path}: ", *named)


# -- broken settings: environment and paths ---------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        pytest.param("INCREMENTAL_MODEL", "Bad[x]", ["INCREMENTAL_MODEL='Bad[x]'", "^[a-z0-9][a-z0-9._-]{0,63}$"], id="model"),
        pytest.param("INCREMENTAL_DB_LOCK_TIMEOUT_S", "soon", ["INCREMENTAL_DB_LOCK_TIMEOUT_S='soon'", "valid number"], id="lock-timeout"),
        pytest.param("INCREMENTAL_DEVICE", "tpu", ["INCREMENTAL_DEVICE='tpu'", "'auto', 'cpu' or 'cuda'"], id="device"),
    ],
)
def test_a_bad_setting_names_its_variable(seeded: Path, variable: str, value: str, named: list[str]) -> None:
    assert_one_line(run_cli(seeded, "status", **{variable: value}), *named, "fix it or unset it")


@pytest.mark.parametrize("kind", ["folder", "empty-file", "text-file", "under-a-file"])
def test_a_database_path_that_is_not_a_database_is_named_with_the_fix(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "feedback.duckdb"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty-file":
        path.touch()
    elif kind == "text-file":
        path.write_text("id,prompt\n1,hello\n")
    else:
        path.write_text("a file")
        path = path / "feedback.duckdb"
    before = path.read_bytes() if path.is_file() else None
    for command in (["status"], ["feedback", "held"], ["feedback", "import", str(tmp_path / "none.jsonl")]):
        assert_one_line(run_cli(tmp_path, *command, INCREMENTAL_DB_PATH=str(path)), f"feedback database {path}: ", "point INCREMENTAL_DB_PATH at")
    assert (path.read_bytes() if path.is_file() else None) == before
    assert not path.is_dir() or not any(path.iterdir())


def test_a_models_root_that_is_a_file_is_named(seeded: Path) -> None:
    (seeded / "models").write_text("not a folder")
    assert_one_line(run_cli(seeded, "status"), f"INCREMENTAL_MODELS_ROOT={seeded / 'models'}: is a file, not a folder")


# -- markup in paths and values never crashes a command ------------------------------------------


def test_brackets_in_a_path_and_in_values_print_as_typed(tmp_path: Path) -> None:
    folder = tmp_path / "in["
    folder.mkdir()
    row = feedback_row(id=ids_in("train", 1)[0], prompt="[bold]notes[/] [/x]", output="out [/x]")  # a new row: previewed
    path = jsonl(folder / "x].jsonl", json.dumps(row))
    for expected in ("Imported 1 rows", "Imported 0 rows"):  # the retry works: the first import printed and exited 0
        done = run_cli(tmp_path, "feedback", "import", str(path))
        assert done.returncode == 0 and f"{expected} from {path}" in done.stdout, done.stdout + done.stderr
    preview = run_cli(tmp_path, "dataset", "preview")
    assert preview.returncode == 0, preview.stdout + preview.stderr
    assert "[bold]notes[/] [/x]" in preview.stdout and "out [/x]" in preview.stdout
    assert "Traceback" not in preview.stdout + preview.stderr
